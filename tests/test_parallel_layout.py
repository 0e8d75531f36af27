"""The one layout type: derivations, rank coordinates, invalid combinations, and the
comparison of a config with the groups' layout (pure logic, no processes)."""

import pytest

from megacore.model_parallel_config import ModelParallelConfig
from megacore.parallel_layout import (ParallelLayout, check_config_matches_layout,
                                      config_layout_mismatches)
from tests.test_parallel_state import ALL_LAYOUTS


# -- derivations ---------------------------------------------------------------------------
def test_dp_and_expert_dp_follow_from_the_world_size():
    layout = ParallelLayout(16, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                            expert_model_parallel_size=4, expert_tensor_parallel_size=1)
    assert layout.data_parallel_size == 4          # 16 / (tp 2 * cp 1 * pp 2)
    assert layout.expert_data_parallel_size == 2   # 16 / (etp 1 * ep 4 * pp 2)
    assert ParallelLayout(8, tensor_model_parallel_size=2).expert_tensor_parallel_size == 2


def test_from_degrees_derives_the_world_size():
    layout = ParallelLayout.from_degrees(tp=2, pp=2, dp=3, cp=2)
    assert layout.world_size == 24 and layout.data_parallel_size == 3
    assert layout == ParallelLayout(24, tensor_model_parallel_size=2,
                                    pipeline_model_parallel_size=2, context_parallel_size=2)


def test_from_config_reads_every_degree_field():
    config = ModelParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                 virtual_pipeline_model_parallel_size=2,
                                 expert_model_parallel_size=2)
    layout = ParallelLayout.from_config(config, world_size=8)
    assert (layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size,
            layout.virtual_pipeline_model_parallel_size, layout.expert_model_parallel_size,
            layout.expert_tensor_parallel_size, layout.data_parallel_size) == (2, 2, 2, 2, 2, 2)
    assert layout.num_model_chunks == 2


def test_degrees_are_the_checkpoint_entry():
    layout = ParallelLayout(8, tensor_model_parallel_size=2, context_parallel_size=2)
    assert layout.degrees() == {
        "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1,
        "data_parallel_size": 2, "context_parallel_size": 2, "expert_model_parallel_size": 1,
        "expert_tensor_parallel_size": 2, "virtual_pipeline_model_parallel_size": None,
        "world_size": 8}


# -- rank coordinates ----------------------------------------------------------------------
def test_coordinates_hand_worked_example():
    layout = ParallelLayout(8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    # rank = tp_rank + 2 * dp_rank + 4 * pp_rank
    assert layout.coordinates(6) == {"tp": 0, "cp": 0, "ep": 0, "dp": 1, "pp": 1}
    assert layout.coordinates(5) == {"tp": 1, "cp": 0, "ep": 0, "dp": 0, "pp": 1}
    assert layout.group_rank(6, "tp-pp") == 2   # in [2, 3, 6, 7]


@pytest.mark.parametrize("expert", [False, True])
def test_group_rank_is_the_index_in_every_group(expert):
    tokens = ["tp", "pp", "dp", "cp-dp", "tp-pp", "tp-cp-dp"] if not expert else \
        ["tp", "ep", "dp", "tp-ep", "tp-ep-pp"]
    checked = 0
    for layout in ALL_LAYOUTS:
        for token in tokens:
            for group in layout.rank_groups(token, expert=expert):
                for index, rank in enumerate(group):
                    assert layout.group_rank(rank, token, expert) == index, (layout, token)
                    checked += 1
    assert checked > 10000  # guards against checking nothing


def test_group_rank_with_another_order():
    layout = ParallelLayout(4, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                            order="pp-tp-cp-ep-dp")
    assert [layout.group_rank(r, "pp") for r in range(4)] == [0, 1, 0, 1]
    assert [layout.group_rank(r, "tp") for r in range(4)] == [0, 0, 1, 1]


# -- invalid combinations ------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda: ParallelLayout.from_degrees(tp=2, dp=0), "data-parallel size must be a positive"),
    (lambda: ParallelLayout.from_degrees(tp=0), "--tensor-model-parallel-size must be"),
    (lambda: ParallelLayout.from_degrees(pp=1, vpp=2), "--pipeline-model-parallel-size >= 2"),
    (lambda: ParallelLayout.from_degrees(tp=2, dp=1, ep=4),
     "--expert-model-parallel-size=4"),
    (lambda: ParallelLayout(4).coordinates(4), "rank 4 is outside the world of 4 ranks"),
    (lambda: ParallelLayout.from_config(ModelParallelConfig(tensor_model_parallel_size=4), 6),
     "--tensor-model-parallel-size=4"),
])
def test_invalid_layouts_explain(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# -- a config against the groups' layout ---------------------------------------------------
def test_config_tp2_against_groups_tp1_names_both_values_and_the_flag():
    config = ModelParallelConfig(tensor_model_parallel_size=2)
    with pytest.raises(ValueError) as info:
        check_config_matches_layout(config, ParallelLayout(2), where="building the model")
    message = str(info.value)
    assert message.startswith("building the model: the config and the process groups")
    assert ("--tensor-model-parallel-size (config.tensor_model_parallel_size) is 2 in the "
            "model config but 1 in the process groups") in message
    # expert tp follows tp in both, so it disagrees as well, and says so.
    assert "--expert-tensor-parallel-size (config.expert_tensor_parallel_size) is 2" in message


def test_config_matching_the_layout_passes_and_defaults_compare_equal():
    layout = ParallelLayout(8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    config = ModelParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                 virtual_pipeline_model_parallel_size=1)
    config.expert_tensor_parallel_size = None   # "same as tp", as the layout has it
    assert config_layout_mismatches(config, layout) == []
    check_config_matches_layout(config, layout)


@pytest.mark.parametrize("field, value, flag", [
    ("pipeline_model_parallel_size", 2, "--pipeline-model-parallel-size"),
    ("context_parallel_size", 2, "--context-parallel-size"),
    ("expert_model_parallel_size", 2, "--expert-model-parallel-size"),
])
def test_every_degree_is_compared(field, value, flag):
    config = ModelParallelConfig(**{field: value})
    problems = config_layout_mismatches(config, ParallelLayout(4))
    assert len(problems) == 1 and problems[0].startswith(f"{flag} (config.{field}) is {value}")


def test_vpp_is_compared_when_the_groups_declare_it():
    config = ModelParallelConfig(pipeline_model_parallel_size=2,
                                 virtual_pipeline_model_parallel_size=2)
    declared = ParallelLayout(2, pipeline_model_parallel_size=2,
                              virtual_pipeline_model_parallel_size=4)
    assert config_layout_mismatches(config, declared) == [
        "--num-virtual-stages-per-pipeline-rank (config.virtual_pipeline_model_parallel_size) "
        "is 2 in the model config but 4 in the process groups"]
    # A grid initialized without vpp tracks no virtual stages: the chunks are the config's.
    assert config_layout_mismatches(config, ParallelLayout(2, pipeline_model_parallel_size=2)) \
        == []
    plain = ModelParallelConfig(pipeline_model_parallel_size=2)
    assert len(config_layout_mismatches(plain, declared)) == 1
