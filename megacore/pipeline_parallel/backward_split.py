"""One micro-batch's backward through one model chunk, split into B (inputs) and W (weights).

Zero-bubble schedules (ZB-H1, ZBV) need the backward of a pipeline stage in two parts:

* **B** computes ``d loss / d input`` (the gradient the previous stage waits for), and
  nothing else;
* **W**, run later, computes ``d loss / d parameter`` for every parameter of the chunk
  (what the optimizer needs), filling what would otherwise be a pipeline bubble.

The split works on the autograd graph of the chunk, for any module, without knowing its
layers. Call a graph node *on the input path* when the stage input's gradient flows
through it. B runs the engine from the output with only the input as target
(``inputs=[input]``), keeping the graph; PyTorch's own nodes then skip the weight
outputs, and megacore's tensor-parallel linear function does too (it reads the phase from
:mod:`megacore.tensor_parallel.weight_grad_phase`). Some input-path nodes also feed
parameters: a linear's node has an edge to the input path and one to its weight. These
*split nodes* get a pre-hook during B that keeps the gradient arriving at them. W then

1. re-runs each split node alone from its kept gradient, asking only for its edges that
   lead to parameters and not to the input (``W1``), and
2. runs the engine from all those edges into the parameters, accumulating ``.grad``
   (``W2``), so the parameters' post-accumulate hooks (DDP) fire as in a whole backward.

Example: ``y = LN(x W1^T) W2^T``. Input path: ``mm2 -> LN -> mm1 -> x``. Split nodes:
``mm2`` (edge to ``W2``), ``LN`` (edges to its weight and bias), ``mm1`` (edge to
``W1``). B computes ``dy -> d(mm2 in) -> d(LN in) -> dx`` only; W1 computes
``dW2``, ``dLN.weight``, ``dLN.bias``, ``dW1`` from the kept gradients; W2 accumulates.

Each split node is re-run on its own: running them in one engine call would send a
later split node's gradient through an earlier one again and count it twice. Edges
into parameters never reach an input-path node (else they would be on it), so W2's
sub-graphs are disjoint from what B ran and nothing is counted twice.

A chunk whose output does not depend on its input (the first pipeline stage) has
nothing for B to do: its whole backward runs in W. Layers under activation recompute
compute their weight gradients in B (their inner backward is one indivisible node).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

from megacore.tensor_parallel.weight_grad_phase import (
    INPUT_GRAD,
    WEIGHT_GRAD,
    weight_grad_phase,
)

__all__ = ["SplitBackward"]

Node = torch.autograd.graph.Node

# Python autograd functions re-run in W must compute only their weight half there; the
# ones megacore knows to do so (see weight_grad_phase). Any other Python function that
# takes a parameter directly would compute (and communicate) its input half twice.
_PHASE_AWARE_FUNCTIONS = ("LinearWithGradAccumulationAndAsyncCommunicationBackward",)


def _children(node: Node) -> List[Tuple[Node, int]]:
    return [(child, nr) for child, nr in node.next_functions if child is not None]


def _reachability(root: Node, input_node: Node) -> Tuple[Set[Node], Set[Node]]:
    """Nodes from which the input's node is reachable, and those from which a leaf
    other than the input (a parameter) is reachable (iterative post-order walk)."""
    to_input: Set[Node] = set()
    to_param: Set[Node] = set()
    done: Set[Node] = set()
    stack: List[Tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node in done:
            continue
        if not expanded:
            stack.append((node, True))
            stack.extend((child, False) for child, _ in _children(node) if child not in done)
            continue
        done.add(node)
        if node is input_node or node == input_node:
            to_input.add(node)
            continue
        if not node.next_functions and hasattr(node, "variable"):
            to_param.add(node)   # AccumulateGrad of a leaf that is not the input
            continue
        for child, _ in _children(node):
            if child in to_input:
                to_input.add(node)
            if child in to_param:
                to_param.add(node)
    return to_input, to_param


class SplitBackward:
    """The B and W halves of ``output.backward(output_grad)`` for one chunk.

    Args:
        output: the chunk's output (activation, or the loss on the last stage); its
            ``data`` may have been freed (``deallocate_pipeline_outputs``).
        output_grad: gradient of ``output`` (None for a scalar loss: ones).
        input_tensor: the chunk's input, a leaf with ``requires_grad`` (None on the first
            stage).

    Use: ``grad = split.backward_input()`` (B), later ``split.backward_weight()`` (W).
    """

    def __init__(self, output: torch.Tensor, output_grad: Optional[torch.Tensor],
                 input_tensor: Optional[torch.Tensor]):
        self.output = output
        self.output_grad = output_grad if output_grad is not None else torch.ones_like(output)
        self.input_tensor = input_tensor
        # Split node -> its kept incoming gradients, filled by B's pre-hooks.
        self.kept: Dict[Node, Tuple[Optional[torch.Tensor], ...]] = {}
        self.param_edges: Dict[Node, List[Tuple[Node, int]]] = {}
        self.whole_in_w = True
        self.state = "created"

    def backward_input(self) -> Optional[torch.Tensor]:
        """B: the gradient of ``input_tensor`` (None without one); weights untouched."""
        assert self.state == "created", f"backward_input called when {self.state}"
        self.state = "input_done"
        root = self.output.grad_fn
        if self.input_tensor is None or root is None:
            return None
        input_node = get_gradient_edge(self.input_tensor).node
        to_input, to_param = _reachability(root, input_node)
        if root not in to_input:
            raise RuntimeError("the stage's output does not depend on the tensor given to "
                               "set_input_tensor; a pipeline stage must use its input")
        self.whole_in_w = False
        handles = self._hook_split_nodes(to_input, to_param)
        try:
            with weight_grad_phase(INPUT_GRAD):
                (grad,) = _run_engine((self.output,), (self.output_grad,),
                                      inputs=(self.input_tensor,), keep_graph=True)
        finally:
            for handle in handles:
                handle.remove()
        return grad

    def backward_weight(self) -> None:
        """W: accumulate every parameter's gradient into ``.grad`` (hooks fire)."""
        assert self.state == "input_done", f"backward_weight called when {self.state}"
        self.state = "weight_done"
        if self.whole_in_w:
            _run_engine((self.output,), (self.output_grad,), inputs=(), keep_graph=False,
                        accumulate=True)
            return
        edges: Dict[Tuple[Node, int], torch.Tensor] = {}
        with weight_grad_phase(WEIGHT_GRAD):
            for node, grads in self.kept.items():
                self._rerun_split_node(node, grads, edges)
        self.kept.clear()
        if edges:
            keys = list(edges)
            _run_engine(tuple(GradientEdge(n, nr) for n, nr in keys),
                        tuple(edges[k] for k in keys), inputs=(), keep_graph=False,
                        accumulate=True)
        self.output = self.output_grad = self.input_tensor = None

    # -- internals -----------------------------------------------------------------------
    def _hook_split_nodes(self, to_input: Set[Node], to_param: Set[Node]) -> list:
        handles = []
        for node in to_input:
            edges = [(c, nr) for c, nr in _children(node) if c in to_param and c not in to_input]
            if not edges:
                continue
            name = type(node).__name__
            if hasattr(node, "_forward_cls") and name not in _PHASE_AWARE_FUNCTIONS:
                raise RuntimeError(
                    f"cannot split the backward of autograd function {name}: it takes a "
                    "parameter directly but does not follow weight_grad_phase; use "
                    "--pipeline-schedule 1f1b for this model")
            self.param_edges[node] = edges
            handles.append(node.register_prehook(self._keeper(node)))
        return handles

    def _keeper(self, node: Node):
        def keep(grad_outputs):
            self.kept[node] = tuple(grad_outputs)
        return keep

    def _rerun_split_node(self, node: Node, grads, edges) -> None:
        roots = [(GradientEdge(node, i), g) for i, g in enumerate(grads) if g is not None]
        targets = self.param_edges[node]
        if not roots:
            return
        results = _run_engine(tuple(r for r, _ in roots), tuple(g for _, g in roots),
                              inputs=tuple(GradientEdge(c, nr) for c, nr in targets),
                              keep_graph=True)
        for key, grad in zip(targets, results):
            if grad is None:
                continue
            edges[key] = grad if key not in edges else edges[key] + grad


def _run_engine(roots, grads, *, inputs, keep_graph: bool, accumulate: bool = False):
    """The autograd engine without ``torch.autograd.grad``'s shape check on the roots
    (a pipeline output whose ``data`` was freed keeps its graph but not its shape)."""
    return torch.autograd.Variable._execution_engine.run_backward(
        tensors=roots, grad_tensors=grads, keep_graph=keep_graph, create_graph=False,
        inputs=inputs, allow_unreachable=True, accumulate_grad=accumulate)
