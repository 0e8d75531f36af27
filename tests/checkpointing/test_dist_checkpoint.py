"""The torch_dist format: round trips, and loading into other tp/pp/vpp/dp layouts.

Each rank compares against its own reference: the toy model built from the same seed in
the *loading* layout and stepped the same way (``toy_model``), so a correct reshard
reproduces it exactly up to the rounding of a layout-independent elementwise step.
"""


import torch

from megacore.checkpointing import CheckpointError, load_checkpoint, save_checkpoint
from tests.checkpointing import toy_model as toy
from tests.multirank import run_distributed

SEED, OTHER_SEED = 1234, 77


def _reference(tp, pp, vpp):
    toy.setup(tp, pp, vpp)
    chunks = toy.build_chunks(SEED, vpp or 1)
    opt, sched = toy.build_optimizer(chunks)
    toy.fake_step(chunks, opt, sched)
    return chunks, opt, sched


def _fresh(vpp):
    chunks = toy.build_chunks(OTHER_SEED, vpp or 1)
    return (chunks,) + toy.build_optimizer(chunks)


def _assert_load_has_work_to_do(before, expected):
    """The state a load starts from must differ from the saved one, or a load that did
    nothing would pass: every weight matrix (drawn from another seed) differs, and so does
    the scheduler's step count. (1-D tensors may agree: norms start at one, biases at 0.)"""
    matrices = [k for k, want in expected.items()
                if k.startswith("model") and torch.is_tensor(want) and want.dim() >= 2]
    same = [k for k in matrices if torch.equal(before[k], expected[k])]
    assert matrices and not same, f"the fresh model already holds the saved values of {same}"
    steps = [k for k in expected if k.startswith("sched.") and "num_steps" in k]
    assert steps and all(before[k] != expected[k] for k in steps), steps


def _save_and_round_trip(save_dir, fmt, tp, pp, vpp):
    chunks, opt, sched = _reference(tp, pp, vpp)
    expected = toy.flat_state(chunks, opt, sched)
    save_checkpoint(5, chunks, opt, sched, save_dir=save_dir, ckpt_format=fmt,
                    consumed_train_samples=40, consumed_valid_samples=8,
                    config_dict={"hidden_size": toy.HIDDEN, "tp": tp})
    randoms_after_save = toy.draw_randoms()
    torch.manual_seed(999)  # scramble: the load must restore the generators
    fresh, opt2, sched2 = _fresh(vpp)
    _assert_load_has_work_to_do(toy.flat_state(fresh, opt2, sched2), expected)
    result = load_checkpoint(fresh, opt2, sched2, load_dir=save_dir)
    assert result == (5, 40, 8, {"hidden_size": toy.HIDDEN, "tp": tp}), result
    n = toy.assert_states_equal(toy.flat_state(fresh, opt2, sched2), expected, exact=True)
    for got, want in zip(toy.draw_randoms(), randoms_after_save):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    return n


def _load_into_layout(load_dir, tp, pp, vpp):
    chunks, opt, sched = _reference(tp, pp, vpp)
    expected = toy.flat_state(chunks, opt, sched)
    fresh, opt2, sched2 = _fresh(vpp)
    iteration, consumed, _, config = load_checkpoint(fresh, opt2, sched2, load_dir=load_dir)
    assert iteration == 5 and consumed == 40
    return toy.assert_states_equal(toy.flat_state(fresh, opt2, sched2), expected, exact=False)


def test_torch_dist_round_trip_tp2_pp2(tmp_path):
    counts = run_distributed(_save_and_round_trip, 4,
                             args=(str(tmp_path), "torch_dist", 2, 2, None))
    # Every rank compared its params plus 5 optimizer tensors each (not an empty check).
    assert min(counts) >= 20


def test_torch_dist_reshards_between_layouts(tmp_path):
    tp2pp2, tp1pp1 = str(tmp_path / "tp2pp2"), str(tmp_path / "tp1pp1")
    run_distributed(_save_and_round_trip, 4, args=(tp2pp2, "torch_dist", 2, 2, None))
    assert run_distributed(_load_into_layout, 1, args=(tp2pp2, 1, 1, None))[0] > 40
    run_distributed(_save_and_round_trip, 1, args=(tp1pp1, "torch_dist", 1, 1, None))
    assert min(run_distributed(_load_into_layout, 4, args=(tp1pp1, 2, 2, None))) > 10
    # pp=2 with two virtual stages per rank and dp=2: layers spread over 4 chunks.
    assert min(run_distributed(_load_into_layout, 4, args=(tp2pp2, 1, 2, 2))) > 10


def _strict_errors(load_dir):
    toy.setup(1, 1)
    untied = toy.build_chunks(OTHER_SEED, tie=False)  # needs model/output_layer.weight
    messages = []
    try:
        load_checkpoint(untied, None, None, load_dir=load_dir)
    except CheckpointError as exc:
        messages.append(str(exc))
    load_checkpoint(untied, None, None, load_dir=load_dir, strict=False)
    reference = toy.build_chunks(SEED)[0]
    torch.testing.assert_close(untied[0].layers[0].norm.weight, reference.layers[0].norm.weight,
                               rtol=0, atol=0)  # the rest loaded (before the step: no opt)
    return messages


def _save_untied(save_dir):
    toy.setup(1, 1)
    save_checkpoint(1, toy.build_chunks(SEED), None, None, save_dir=save_dir,
                    ckpt_format="torch_dist", consumed_train_samples=0)


def test_torch_dist_strict_names_missing_keys(tmp_path):
    run_distributed(_save_untied, 1, args=(str(tmp_path),))
    (messages,) = run_distributed(_strict_errors, 1, args=(str(tmp_path),))
    assert len(messages) == 1
    assert "model/output_layer.weight" in messages[0] and str(tmp_path) in messages[0]
