"""The mapping pretraining (method.md 2.1): every layer's mapping towards its target uv.

One pass visits every frame once; at each frame every layer takes one Adam step on
``pretrain_batch_size`` uniform pixels of that frame (for a fitted object, half of them inside
the window where its target is in (-1, 1)), loss ``|target - mapping(x, y, t)|``. The layers'
parameters are disjoint, so one step on the sum of their losses is each layer's own step
(Adam is per parameter): the layers train together, one optimizer step per frame instead of
one per layer and frame.

A step is a few hundred small kernels, so its time is launch overhead (a 1080p shot's 2 x 25 x
100 steps took about 10 s on an H200, docs/benchmarks.md, "Mapping pretraining"). On CUDA the
step is captured once as a CUDA graph (after two eager warm-ups on a side stream, PyTorch's
recipe) and replayed with the frame index in a device tensor; the sampling draws from the
trainer's generator, registered with the graph.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .uvfit import UVInit


class MappingPretraining:
    """One joint step per frame over every layer's mapping (module docstring)."""

    def __init__(self, model, geom, init: UVInit, batch: int, lr: float, gen: torch.Generator,
                 device: torch.device, graphs: bool) -> None:
        self.model, self.geom, self.batch, self.gen, self.device = model, geom, int(batch), gen, device
        self.n_layers = model.n_layers
        cuda = device.type == "cuda"
        params = [p for i in range(self.n_layers) for p in model.mappings[i].parameters()]
        self.optimizer = torch.optim.Adam([{"params": params, "lr": lr}],
                                          **({"fused": True, "capturable": True} if cuda else {}))
        self.init = replace(init, offsets=init.offsets.to(device=device, dtype=torch.float32))
        self.fitted = init.mode == "fit"
        self.frame = torch.zeros(1, dtype=torch.long, device=device)  # the step's frame, in place
        self.graphs = bool(graphs and cuda)
        self._graph = None
        self._warm = 0

    def loss(self, gen: torch.Generator | None = None) -> torch.Tensor:
        """The sum over layers of the mean distance to the target at the current frame, on
        samples drawn from ``gen`` (default: the trainer's generator)."""
        g, B, gen = self.geom, self.batch, gen or self.gen
        f = self.frame.float().expand(B)
        total = None
        for i in range(self.n_layers):
            x = torch.randint(0, g.width, (B,), device=self.device, generator=gen)
            y = torch.randint(0, g.height, (B,), device=self.device, generator=gen)
            xyt = g.xyt(x.float(), y.float(), f)
            if self.fitted and i < self.n_layers - 1:  # half the points where the object's target is in (-1, 1)
                n = B // 2
                lo, hi = self.init.window(i, self.frame)
                r = torch.rand(n, 2, device=self.device, generator=gen)
                xy = g.px(lo + r * (hi - lo))
                xy = torch.stack([xy[:, 0].clamp(0, g.width - 1), xy[:, 1].clamp(0, g.height - 1)], -1)
                xyt = torch.cat([g.xyt(xy[:, 0], xy[:, 1], f[:n]), xyt[n:]])
            target = self.init.target(i, xyt[:, :2], self.frame)
            if self.fitted:  # tanh reaches (-1, 1) only
                target = target.clamp(-0.98, 0.98)
            loss = (target - self.model.mapping(i, xyt)).norm(dim=1).mean()
            total = loss if total is None else total + loss
        return total

    def _eager(self, zero_grad: bool = True) -> None:
        """One step; captured into a graph without ``zero_grad`` (the gradients are set to None
        before the capture, and each replay's backward writes them afresh)."""
        loss = self.loss()
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def step(self, frame: int) -> None:
        """One Adam step of every layer on pixels of ``frame``."""
        self.frame.fill_(int(frame))
        if not self.graphs:
            self._eager()
            return
        if self._graph is not None:
            self._graph.replay()
            return
        if self._warm < 2:
            self._warm += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._eager()
            torch.cuda.current_stream(self.device).wait_stream(side)
            return
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.gen)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            self._eager(zero_grad=False)
        self._graph = graph
        graph.replay()  # capture records without running: this is the step itself

    @torch.no_grad()
    def distance(self, frames: int = 4) -> float:
        """The mean distance to the target over a few frames' samples (for tests and benchmarks)."""
        keep = int(self.frame)
        n = self.geom.n_frames
        gen = torch.Generator(device=self.device)
        gen.manual_seed(1234)  # not the trainer's: measuring leaves its random stream as it was
        out = 0.0
        for f in torch.linspace(0, n - 1, min(frames, n)).round().long().tolist():
            self.frame.fill_(f)
            out += float(self.loss(gen)) / self.n_layers
        self.frame.fill_(keep)
        return out / min(frames, n)
