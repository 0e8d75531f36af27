"""Layer ranges per (pipeline rank, virtual rank): pure function, validated with flag names."""

import pytest

from megacore.pipeline_parallel.layer_split import (
    get_layer_offset_and_count, pipeline_layer_counts, virtual_stages_from_layers_per_stage)


def _ranges(num_layers, pp, vpp=None, first=None, last=None):
    return {(r, c): get_layer_offset_and_count(num_layers, pp, r, vpp, c, first, last)
            for r in range(pp) for c in range(vpp or 1)}


@pytest.mark.parametrize("num_layers, pp, vpp, first, last", [
    (8, 2, None, None, None), (8, 4, 2, None, None), (12, 4, 3, None, None),
    (10, 4, None, 1, 3), (6, 2, 2, 2, 4), (16, 4, 2, 2, 6), (7, 3, None, 3, None),
    (5, 3, None, None, 1), (5, 2, None, 0, 5),
])
def test_layers_tile_the_model_in_virtual_stage_order(num_layers, pp, vpp, first, last):
    ranges = _ranges(num_layers, pp, vpp, first, last)
    # Virtual stage v = chunk * pp + rank takes the layers right after v - 1.
    expected_offset = 0
    for c in range(vpp or 1):
        for r in range(pp):
            offset, count = ranges[(r, c)]
            assert offset == expected_offset
            expected_offset += count
    assert expected_offset == num_layers
    if first is not None:
        assert sum(ranges[(0, c)][1] for c in range(vpp or 1)) == first
    if last is not None:
        assert sum(ranges[(pp - 1, c)][1] for c in range(vpp or 1)) == last


def test_worked_examples():
    assert [get_layer_offset_and_count(10, 4, r, None, None, 1, 3) for r in range(4)] == [
        (0, 1), (1, 3), (4, 3), (7, 3)]
    assert pipeline_layer_counts(8, 2, 2) == [[2, 2], [2, 2]]
    assert get_layer_offset_and_count(8, 2, 0, 2, 1) == (4, 2)
    assert virtual_stages_from_layers_per_stage(16, 2, 2) == 4


@pytest.mark.parametrize("args, flags", [
    ((7, 2, 0), ["--num-layers=7", "--pipeline-model-parallel-size=2"]),
    ((10, 4, 0, None, None, 2, None), ["--decoder-first-pipeline-num-layers=2", "--num-layers"]),
    ((10, 2, 0, None, None, 3, 3), ["--decoder-first-pipeline-num-layers=3",
                                    "--decoder-last-pipeline-num-layers=3"]),
    ((8, 2, 0, 2, 0, 3, None), ["--num-virtual-stages-per-pipeline-rank",
                                "--num-layers-per-virtual-pipeline-stage"]),
    ((8, 1, 0, None, None, 4, None), ["need --pipeline-model-parallel-size >= 2"]),
    ((8, 2, 2), ["pipeline rank 2 is outside"]),
])
def test_invalid_splits_name_the_flags(args, flags):
    with pytest.raises(ValueError) as info:
        get_layer_offset_and_count(*args)
    for flag in flags:
        assert flag in str(info.value)


def test_layers_per_virtual_stage_must_divide():
    with pytest.raises(ValueError, match="--num-layers-per-virtual-pipeline-stage=3"):
        virtual_stages_from_layers_per_stage(16, 2, 3)


def test_zbv_places_virtual_stages_in_a_v():
    # Module docstring's example: 8 layers, pp=2 -> rank 0 holds 0-1 and 6-7.
    assert {(r, c): get_layer_offset_and_count(8, 2, r, 2, c, v_shape=True)
            for r in range(2) for c in range(2)} == {
        (0, 0): (0, 2), (1, 0): (2, 2), (1, 1): (4, 2), (0, 1): (6, 2)}
    for pp in range(1, 9):
        # Chunk 0 of rank r is virtual stage r, chunk 1 is 2 pp - 1 - r; they tile the model.
        ranges = {get_layer_offset_and_count(4 * pp, pp, r, 2, c, v_shape=True)
                  for r in range(pp) for c in range(2)}
        assert sorted(ranges) == [(2 * v, 2) for v in range(2 * pp)]
        assert get_layer_offset_and_count(4 * pp, pp, 0, 2, 1, v_shape=True) == (4 * pp - 2, 2)


@pytest.mark.parametrize("args, flags", [
    ((8, 2, 0, None, 0), ["--pipeline-schedule zbv places exactly 2 model chunks",
                          "--num-virtual-stages-per-pipeline-rank"]),
    ((12, 2, 0, 3, 0), ["--num-virtual-stages-per-pipeline-rank"]),
    ((8, 2, 0, 2, 0, 1, 3), ["--decoder-first-pipeline-num-layers",
                             "--decoder-last-pipeline-num-layers"]),
    ((6, 2, 0, 2, 0), ["pipeline rank 0 holds 3 layers"]),
])
def test_zbv_invalid_splits_name_the_flags(args, flags):
    with pytest.raises(ValueError) as info:
        get_layer_offset_and_count(*args, v_shape=True)
    for flag in flags:
        assert flag in str(info.value)
