"""``RankLayout`` (checkpointing's view of one rank) and the converter's ``MegacoreLayout``
read their degrees from one ``ParallelLayout``; their checkpoint entries stay as before."""

import pytest

from megacore.checkpointing.conversion import MegacoreLayout
from megacore.checkpointing.parallel_layout import RankLayout, current_rank_layout
from megacore.parallel_layout import ParallelLayout


def test_rank_coordinates_are_the_group_indices():
    # 8 ranks: tp=2, cp=2 (dp=2); experts etp=1, ep=4 (edp=2).
    layout = ParallelLayout(8, tensor_model_parallel_size=2, context_parallel_size=2,
                            expert_model_parallel_size=4, expert_tensor_parallel_size=1)
    for rank in range(8):
        view = RankLayout(layout=layout, global_rank=rank)
        assert (view.tp, view.cp, view.dp, view.ep, view.etp) == (2, 2, 4, 4, 1)
        for attr, token, expert in [("tp_rank", "tp", False), ("dp_rank", "cp-dp", False),
                                    ("pp_rank", "pp", False), ("ep_rank", "ep", True),
                                    ("etp_rank", "tp", True), ("edp_rank", "dp", True)]:
            group = next(g for g in layout.rank_groups(token, expert) if rank in g)
            assert getattr(view, attr) == group.index(rank), (rank, attr)


def test_trivial_layout_counts_built_chunks_as_vpp():
    view = current_rank_layout(num_model_chunks=2)
    assert view.world_size == 1 and view.vpp == 2 and view.groups is None
    assert view.degrees() == {
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
        "data_parallel_size": 1, "context_parallel_size": 1, "expert_model_parallel_size": 1,
        "expert_tensor_parallel_size": 1, "virtual_pipeline_model_parallel_size": 2,
        "world_size": 1}
    assert RankLayout().vpp is None


def test_megacore_layout_degrees_come_from_its_parallel_layout():
    layout = MegacoreLayout(tp=2, pp=2, ep=2, vpp=2)
    assert layout.parallel == ParallelLayout.from_degrees(tp=2, pp=2, dp=2, ep=2, vpp=2)
    assert layout.num_chunks == 2
    assert layout.degrees() == {
        "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
        "data_parallel_size": None, "context_parallel_size": 1, "expert_model_parallel_size": 2,
        "expert_tensor_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2,
        "world_size": 8}
    assert layout.config_fields()["expert_tensor_parallel_size"] == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(tp=0), r"rank-file layout tp=0, pp=1, ep=1, vpp=None: --tensor-model-parallel-size"),
    (dict(pp=1, vpp=2), r"--pipeline-model-parallel-size >= 2"),
])
def test_megacore_layout_refuses_invalid_degrees(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MegacoreLayout(**kwargs)
