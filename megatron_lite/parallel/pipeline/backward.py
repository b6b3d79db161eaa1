"""Split one chunk's backward into I (input gradient) and W (weight gradients), for zero-bubble.

I runs autograd only toward the chunk's input ``x``, keeping the graph (``retain_graph``) and
capturing, at each *intermediate* node, the gradient flowing into it. An intermediate is a node on
the input path (a node from which ``x`` is reachable) with an edge that leaves that path toward a
parameter: e.g. the ``MmBackward`` of ``x @ W.t()``, whose input-path output is computed in I and
whose weight output (the expensive ``dW = x^T dy`` GEMM) is left for W. W restarts autograd from
the intermediates with the captured gradients, restricted to the parameters, so no input-path work
is done twice; gradients accumulate into ``.grad`` through the usual AccumulateGrad nodes (so
gradient hooks fire as in a plain backward).

This follows the approach of ``torch.distributed.pipelining``'s ``stage_backward_input`` /
``stage_backward_weight``: parameters sharing an intermediate form one group, each group is one
autograd call, and when a group has several intermediates each is clamped to its captured
gradient (a prehook returns it) so a gradient reaching it again through another is not counted
twice. Custom autograd Functions that compute every input's gradient in one ``backward`` (e.g.
the tensor-parallel linears) cannot skip the weight GEMM in I; results stay exact, only the
saving is lost for them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge


def _parents(root: Node) -> dict[Node, list[Node]]:
    """Reverse graph of everything reachable from ``root``: node -> the nodes that feed it grads."""
    parents: dict[Node, list[Node]] = defaultdict(list)
    seen, stack = {root}, [root]
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            parents[child].append(node)
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return parents


def _upward(start: Node, parents: dict[Node, list[Node]], stop: set[Node]) -> tuple[set[Node], set[Node]]:
    """Nodes above ``start`` (toward the root), not crossing ``stop``; returns (visited, stops hit)."""
    visited, hit, stack = {start}, set(), [start]
    while stack:
        for parent in parents.get(stack.pop(), []):
            if parent in stop:
                hit.add(parent)
            elif parent not in visited:
                visited.add(parent)
                stack.append(parent)
    return visited, hit


class WeightGrad:
    """What W needs after I: parameter groups with their intermediates and captured gradients."""

    def __init__(self, groups: list[tuple[list[torch.Tensor], list[Node]]]) -> None:
        self.groups = groups
        self.captured: dict[Node, tuple[torch.Tensor | None, ...]] = {}

    def run(self) -> None:
        """W: accumulate every parameter gradient into ``.grad``; frees the captured state."""
        for params, intermediates in self.groups:
            edges, grads = [], []
            for node in intermediates:
                for i, g in enumerate(self.captured.get(node, ())):
                    if g is not None:
                        edges.append(GradientEdge(node, i))
                        grads.append(g)
            if not edges:
                continue
            handles = []
            if len(intermediates) > 1:
                for node in intermediates:
                    saved = self.captured.get(node)
                    handles.append(node.register_prehook(lambda _, saved=saved: saved))
            try:
                # retain: a group's call may pass through nodes another group still needs
                torch.autograd.backward(edges, grads, retain_graph=True, inputs=params)
            finally:
                for h in handles:
                    h.remove()
        self.groups, self.captured = [], {}


def backward_input(
    root: torch.Tensor | GradientEdge, grad: torch.Tensor, x: torch.Tensor, params: Iterable[torch.Tensor]
) -> tuple[torch.Tensor, WeightGrad]:
    """I: the gradient of ``root`` (upstream gradient ``grad``) with respect to the leaf ``x``.

    Returns ``(dx, weight_grad)``; call ``weight_grad.run()`` later for W.
    """
    root_edge = root if isinstance(root, GradientEdge) else get_gradient_edge(root)
    parents = _parents(root_edge.node)
    x_node = get_gradient_edge(x).node
    on_input_path, _ = _upward(x_node, parents, set())
    if root_edge.node not in on_input_path:
        raise ValueError("the chunk output does not depend on its input; nothing to split")
    # Each parameter's intermediates: the input-path nodes first met walking up from it.
    owner: dict[Node, int] = {}
    groups: list[tuple[list[torch.Tensor], set[Node]]] = []
    for p in params:
        node = get_gradient_edge(p).node
        if not p.requires_grad or node not in parents:
            continue
        _, hit = _upward(node, parents, on_input_path)
        merged = {owner[n] for n in hit if n in owner}
        params_, inter = [p], set(hit)
        for g in sorted(merged, reverse=True):
            params_ += groups[g][0]
            inter |= groups[g][1]
            groups[g] = ([], set())
        groups.append((params_, inter))
        for n in inter:
            owner[n] = len(groups) - 1
    job = WeightGrad([(ps, list(inter)) for ps, inter in groups if ps])

    def capture(node: Node):
        def hook(grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
            job.captured[node] = grad_outputs

        return hook

    handles = [n.register_prehook(capture(n)) for _, inter in job.groups for n in inter]
    try:
        (dx,) = torch.autograd.grad([root_edge], [x], [grad], retain_graph=True)
    finally:
        for h in handles:
            h.remove()
    return dx, job
