"""Rank layout (pure logic, every layout with world <= 8) and real groups on gloo ranks."""

import itertools

import pytest
import torch
import torch.distributed as dist

from megacore import parallel_state as ps
from tests.multirank import run_distributed


def _all_layouts(max_world=8):
    for world in range(1, max_world + 1):
        for tp, pp, cp, ep, etp in itertools.product(range(1, world + 1), repeat=5):
            try:
                yield ps.ParallelLayout(world, tp, pp, context_parallel_size=cp,
                                        expert_model_parallel_size=ep,
                                        expert_tensor_parallel_size=etp)
            except ValueError:
                continue


ALL_LAYOUTS = list(_all_layouts())


def test_layout_enumeration_is_not_trivial():
    # Guards the test below against silently checking nothing.
    assert len(ALL_LAYOUTS) > 300
    assert any(l.expert_model_parallel_size == 4 and l.pipeline_model_parallel_size == 2
               for l in ALL_LAYOUTS)


def test_every_group_family_partitions_the_world():
    for layout in ALL_LAYOUTS:
        families = layout.all_groups()
        expected_sizes = {
            "tp": layout.tensor_model_parallel_size, "cp": layout.context_parallel_size,
            "dp": layout.data_parallel_size, "pp": layout.pipeline_model_parallel_size,
            "dp_cp": layout.data_parallel_size * layout.context_parallel_size,
            "mp": layout.tensor_model_parallel_size * layout.pipeline_model_parallel_size,
            "ep": layout.expert_model_parallel_size,
            "expt_tp": layout.expert_tensor_parallel_size,
            "expt_dp": layout.expert_data_parallel_size,
        }
        for name, groups in families.items():
            if name in ("embd", "pos_embd"):
                continue
            flat = sorted(r for g in groups for r in g)
            assert flat == list(range(layout.world_size)), (layout, name, groups)
            if name in expected_sizes:
                assert {len(g) for g in groups} == {expected_sizes[name]}, (layout, name)


def test_groups_are_orthogonal():
    """A tp group and a dp group meet in exactly one rank, and so on for every pair of axes."""
    for layout in ALL_LAYOUTS:
        f = layout.all_groups()
        for a, b in [("tp", "dp"), ("tp", "pp"), ("dp", "pp"), ("cp", "tp"), ("cp", "dp"),
                     ("ep", "expt_dp"), ("expt_tp", "ep")]:
            for ga in f[a]:
                for gb in f[b]:
                    inter = set(ga) & set(gb)
                    assert len(inter) <= 1, (layout, a, b, ga, gb)


def test_expert_groups_nest_inside_pipeline_stages():
    for layout in ALL_LAYOUTS:
        pp_of = {r: i for i, g in enumerate(layout.rank_groups("pp")) for r in g}
        stage = {r: g.index(r) for g in layout.rank_groups("pp") for r in g}
        for g in layout.rank_groups("tp-ep", expert=True):
            assert len({stage[r] for r in g}) == 1, (layout, g)
        del pp_of


def test_hand_worked_example_tp2_pp2():
    layout = ps.ParallelLayout(8, tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert layout.data_parallel_size == 2
    assert layout.rank_groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.rank_groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.rank_groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.rank_groups("tp-pp") == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert layout.embedding_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.position_embedding_groups() == [[0], [1], [2], [3]]


def test_hand_worked_example_cp_and_ep():
    # 8 ranks, tp=2, cp=2 -> dp=2; experts: etp=1, ep=4 -> edp=2.
    layout = ps.ParallelLayout(8, tensor_model_parallel_size=2, context_parallel_size=2,
                               expert_model_parallel_size=4, expert_tensor_parallel_size=1)
    assert layout.rank_groups("cp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.rank_groups("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.rank_groups("cp-dp") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout.rank_groups("tp-cp") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.rank_groups("ep", expert=True) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert layout.rank_groups("dp", expert=True) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.expert_data_parallel_size == 2


def test_other_order_puts_pp_fastest():
    layout = ps.ParallelLayout(4, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                               order="pp-tp-cp-ep-dp")
    assert layout.rank_groups("pp") == [[0, 1], [2, 3]]
    assert layout.rank_groups("tp") == [[0, 2], [1, 3]]


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=6, tensor_model_parallel_size=4),
     "--tensor-model-parallel-size=4"),
    (dict(world_size=8, tensor_model_parallel_size=2, pipeline_model_parallel_size=8),
     "--pipeline-model-parallel-size=8"),
    (dict(world_size=8, context_parallel_size=3), "--context-parallel-size=3"),
    (dict(world_size=8, pipeline_model_parallel_size=2, expert_model_parallel_size=3),
     "--expert-model-parallel-size=3"),
    (dict(world_size=8, expert_model_parallel_size=4, expert_tensor_parallel_size=4),
     "--expert-tensor-parallel-size=4"),
    (dict(world_size=4, tensor_model_parallel_size=0), "--tensor-model-parallel-size must be"),
    (dict(world_size=4, virtual_pipeline_model_parallel_size=2),
     "--pipeline-model-parallel-size >= 2"),
    (dict(world_size=4, order="tp-dp-pp"), "exactly once"),
    (dict(world_size=4, expert_model_parallel_size=2, order="ep-tp-cp-dp-pp"),
     "'ep' must be next to 'dp'"),
])
def test_impossible_layouts_name_the_flags(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ps.ParallelLayout(**kwargs)


def test_error_suggests_a_fit():
    with pytest.raises(ValueError) as info:
        ps.ParallelLayout(6, tensor_model_parallel_size=4)
    assert "[1, 2, 3, 6]" in str(info.value)


def test_a_collection_must_match_its_layout():
    # A hand-assembled collection (as tests build for reference models) whose groups have a
    # different size than its layout says is refused: code reads both.
    names = ("tp", "cp", "dp", "dp_cp", "pp", "mp", "tp_cp", "tp_dp", "tp_dp_cp", "ep",
             "expt_tp", "tp_ep", "expt_dp", "tp_ep_pp", "embd", "pos_embd")
    ranks = {name: [0] for name in names}
    ps.ProcessGroupCollection(layout=ps.ParallelLayout(1), ranks=ranks,
                              **{name: None for name in names})
    with pytest.raises(ValueError, match="tp has 1 ranks, the layout says 2"):
        ps.ProcessGroupCollection(layout=ps.ParallelLayout(2, tensor_model_parallel_size=2),
                                  ranks=ranks, **{name: None for name in names})


def test_getters_before_initialization_explain():
    with pytest.raises(RuntimeError, match="initialize_model_parallel"):
        ps.get_tensor_model_parallel_world_size()


# -- real groups on gloo ranks ----------------------------------------------------------
def _check_groups(layouts):
    """Initialize each layout; every group must contain this rank and agree across ranks."""
    report = []
    for kwargs in layouts:
        ps.initialize_model_parallel(**kwargs)
        pgc = ps.get_process_group_collection()
        for name in ("tp", "cp", "dp", "dp_cp", "pp", "mp", "tp_cp", "tp_dp", "tp_dp_cp",
                     "ep", "expt_tp", "tp_ep", "expt_dp", "tp_ep_pp", "embd", "pos_embd"):
            group = getattr(pgc, name)
            if group is None:
                continue
            ranks = pgc.ranks[name]
            assert dist.get_process_group_ranks(group) == ranks, name
            # Everybody in the group sees the same member list: all-gather the ranks.
            t = torch.tensor(ranks, dtype=torch.int64)
            gathered = [torch.empty_like(t) for _ in ranks]
            dist.all_gather(gathered, t, group=group)
            assert all(g.tolist() == ranks for g in gathered), name
        tp_sum = torch.tensor([float(dist.get_rank())])
        dist.all_reduce(tp_sum, group=ps.get_tensor_model_parallel_group())
        report.append({
            "tp": (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
            "pp": (ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()),
            "dp": (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()),
            "dp_cp": ps.get_data_parallel_world_size(with_context_parallel=True),
            "cp": ps.get_context_parallel_global_ranks(),
            "ep": (ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
            "edp": ps.get_expert_data_parallel_world_size(),
            "first": ps.is_pipeline_first_stage(), "last": ps.is_pipeline_last_stage(),
            "embd": ps.is_rank_in_embedding_group(),
            "next": ps.get_pipeline_model_parallel_next_rank(),
            "prev": ps.get_pipeline_model_parallel_prev_rank(),
            "tp_sum": tp_sum.item(),
        })
        ps.destroy_model_parallel()
    return report


def test_groups_on_eight_gloo_ranks():
    layouts = [
        dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
        dict(tensor_model_parallel_size=2, context_parallel_size=2,
             expert_model_parallel_size=4, expert_tensor_parallel_size=1),
        dict(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=2),
    ]
    out = run_distributed(_check_groups, 8, args=(layouts,))
    # Layout 0: rank = tp + 2*dp + 4*pp.
    for rank, per_layout in enumerate(out):
        r = per_layout[0]
        assert r["tp"] == (rank % 2, 2)
        assert r["dp"] == ((rank // 2) % 2, 2)
        assert r["pp"] == (rank // 4, 2)
        assert r["first"] == (rank < 4) and r["last"] == (rank >= 4)
        assert r["embd"] is True
        assert r["next"] == (rank + 4) % 8 and r["prev"] == (rank - 4) % 8
        assert r["tp_sum"] == float(2 * (rank - rank % 2) + 1)
        r = per_layout[1]
        assert r["cp"] == [rank % 2 + 4 * (rank // 4), rank % 2 + 4 * (rank // 4) + 2]
        assert r["dp_cp"] == 4
        assert r["ep"] == (rank % 4, 4) and r["edp"] == 2
        r = per_layout[2]
        # vpp rank 0 of 2: first stage true on pp rank 0, last stage false everywhere.
        assert r["pp"] == (rank // 2, 4)
        assert r["first"] == (rank < 2) and r["last"] is False
