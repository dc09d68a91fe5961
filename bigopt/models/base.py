"""The contract every bigopt model follows, and the helpers the models share.

Every model is a plain sequence of layers, each taking ONE tensor and returning ONE tensor,
and ``forward`` is nothing but those layers applied in order. That is the shape DeepSpeed's
``PipelineModule(layers=model.layers(), loss_fn=Model.loss, num_stages=k)`` needs to split a
model into pipeline stages, so the same model object serves data-parallel, ZeRO and pipeline
runs without a second definition. Like nanoGPT's ``model.py``, this package imports only
torch and the standard library.

ZeRO-3 (``deepspeed.zero.Init``): a model built inside that context has each parameter
partitioned as soon as the submodule owning it is built: ``param.data`` is then empty and the
full size is in ``param.ds_shape`` / ``param.ds_numel``. This module accounts for that without
importing DeepSpeed unless such a parameter is actually seen:

* counting (``num_params``, ``full_numel``) reads ``ds_numel``, and FLOPs measured by a forward
  pass are measured on a meta-device copy (``LayeredModel._forward_flops_per_sample``);
* initialization: each model's ``__init__`` snapshots the RNG before building its layers, sets
  parameters in ``_init_weights`` only through ``_init_param``, and ends with ``_finish_init``.
  A plain build just runs ``_init_weights``. Under zero.Init, ``_PartitionedInit`` replays the
  plain build's draws (each layer's default init, then ``_init_weights``) in the same order and
  dtype on CPU, and writes them into the gathered parameters one at a time, so the same seed
  gives bit-identical weights (rounded to the training dtype, as DeepSpeed rounds a plain
  model) and leaves the CPU RNG in the same state.
"""

import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Device = torch.device | str | None


def is_partitioned(param: Tensor) -> bool:
    """True for a ZeRO-3 parameter (built under ``deepspeed.zero.Init``): its data is a shard.

    Tested by attribute, as DeepSpeed's own ``is_zero_param`` does, so that this package never
    imports DeepSpeed.
    """
    return hasattr(param, "ds_id")


def full_numel(param: Tensor) -> int:
    """Element count of the whole parameter, also when ZeRO-3 has partitioned it (numel() == 0)."""
    return int(param.ds_numel) if is_partitioned(param) else param.numel()


def full_shape(param: Tensor) -> torch.Size:
    """Shape of the whole parameter, also when ZeRO-3 has partitioned it (shape == [0])."""
    return param.ds_shape if is_partitioned(param) else param.shape


class RngSnapshot:
    """The CPU (and, if initialized, CUDA) generator states, taken before a model builds layers."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda = torch.cuda.get_rng_state_all() if cuda else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _cpu_tensor(numel: int) -> Tensor:
    """Uninitialized CPU tensor of the default dtype: where ``build_model`` creates parameters.

    Made with ``new_empty`` because ``deepspeed.zero.Init`` patches ``torch.empty`` (and
    ``zeros``, ...) to return the training dtype (e.g. bf16) whatever dtype is asked for; only
    the 0-element seed tensor goes through the patched function.
    """
    return torch.empty(0, device="cpu").new_empty(numel, dtype=torch.get_default_dtype())


class _PartitionedInit:
    """Redo a plain build's initialization in a model built under ``deepspeed.zero.Init``.

    zero.Init runs each layer's default init in the training dtype (bf16 for a bf16 config) on
    the accelerator, with that device's generator and low-precision kernels, so it draws other
    numbers than a plain build (fp32, CPU generator). So the RNG is rewound to the snapshot
    taken before the first layer and the plain build's draws are made again, in its order, on
    full-size CPU tensors of the default dtype (views into one scratch buffer):

    1. each module's ``reset_parameters()`` (what its constructor ran), in construction order,
       which ``modules()`` order is for these models; only its RNG draws are kept;
    2. the model's ``_init_weights``, whose ``_init_param`` calls gather each parameter they
       set (alone, rank 0's values kept) and copy the drawn values in;
    3. for parameters step 2 left alone (e.g. LayerNorm, or every parameter of a model that
       keeps PyTorch's defaults), their module's default init again, from the RNG state saved
       before it in step 1, gathered per module; then the RNG is put back where step 2 left it.

    A parameter is gathered only to be written (once per ``_init_param`` call, or once in step
    3); the scratch buffer (the largest module's size) keeps freed blocks of varying sizes
    from piling up in the allocator. All ranks do the same draws
    in the same order (the gathers are collectives), so the RNG stays in step across ranks.
    """

    def __init__(self, model: nn.Module, rng: RngSnapshot) -> None:
        self.model, self.rng = model, rng
        self.touched: set[int] = set()
        self.modules = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
        for module in self.modules:
            if not hasattr(module, "reset_parameters"):
                raise TypeError(
                    f"{type(module).__name__} owns parameters but has no reset_parameters(), so "
                    "its initialization cannot be replayed exactly under deepspeed.zero.Init"
                )
        largest = max((sum(full_numel(p) for p in m.parameters(recurse=False)) for m in self.modules),
                      default=0)
        self.scratch = _cpu_tensor(largest)

    def views(self, params: list[Tensor]) -> list[Tensor]:
        """Full-size views of the scratch buffer, one per parameter, not overlapping."""
        out, offset = [], 0
        for p in params:
            n = full_numel(p)
            out.append(self.scratch[offset : offset + n].view(full_shape(p)))
            offset += n
        return out

    def draw_defaults(self, module: nn.Module) -> list[Tensor]:
        """Run ``module.reset_parameters()`` on scratch views in place of its parameters."""
        params = list(module.parameters(recurse=False))
        own, views = [p.data for p in params], self.views(params)
        try:
            for p, view in zip(params, views, strict=True):
                p.data = view
            module.reset_parameters()
        finally:
            for p, data in zip(params, own, strict=True):
                p.data = data
        return views

    def run(self) -> None:
        import deepspeed  # only reached for a model DeepSpeed has partitioned

        self.rng.restore()
        states = []
        for module in self.modules:  # 1.
            states.append(torch.get_rng_state())
            self.draw_defaults(module)
        self.model._init_weights()  # 2.
        after = torch.get_rng_state()
        for module, state in zip(self.modules, states, strict=True):  # 3.
            params = list(module.parameters(recurse=False))
            left = [p for p in params if id(p) not in self.touched]
            if not left:
                continue
            torch.set_rng_state(state)
            with deepspeed.zero.GatheredParameters(left, modifier_rank=0):
                views = self.draw_defaults(module)
                with torch.no_grad():
                    for p, view in zip(params, views, strict=True):
                        if id(p) not in self.touched:
                            p.data.copy_(view)
        torch.set_rng_state(after)

    def init_param(self, param: Tensor, init: Callable[[Tensor], Any]) -> None:
        """Step 2 for one parameter."""
        self.touched.add(id(param))
        _init_partitioned(param, init, self.views([param])[0])


def _init_partitioned(param: Tensor, init: Callable[[Tensor], Any], full: Tensor) -> None:
    """``init`` draws into ``full`` (CPU, full size); copied into ``param``, gathered alone."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        init(full)
        with torch.no_grad():
            param.data.copy_(full)


class LayeredModel(nn.Module):
    """Base class: a model that is exactly ``layers()`` applied in sequence."""

    #: Name used by ``bigopt.models.build_model`` and in ``arch()["kind"]``.
    kind: ClassVar[str] = ""

    def layers(self) -> list[nn.Module]:
        """The layers, in order; a pipeline engine may cut between any two of them."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        # Deliberately nothing but the layer sequence: anything done here and not in a layer
        # would be silently skipped when PipelineModule runs the layers itself.
        for layer in self.layers():
            x = layer(x)
        return x

    @staticmethod
    def loss(output: Tensor, target: Tensor) -> Tensor:
        """Mean cross entropy over every prediction.

        A staticmethod so ``PipelineModule(loss_fn=GPT.loss)`` can call it as a plain function
        on the last stage. Works for logits ``[B, V]`` vs ``[B]`` and ``[B, T, V]`` vs ``[B, T]``
        by flattening all leading dimensions.
        """
        return F.cross_entropy(output.reshape(-1, output.size(-1)), target.reshape(-1))

    def num_params(self) -> int:
        """Total number of parameters (shared ones counted once), ZeRO-3 partitioned or not."""
        return sum(full_numel(p) for p in self.parameters())

    def flops_per_sample(self) -> float:
        """Training FLOPs (forward + backward) for one sample; used for MFU and cost models."""
        raise NotImplementedError

    def example_input(self, batch_size: int, *, device: Device = None) -> tuple[Tensor, Tensor]:
        """A random ``(input, target)`` batch of the right shape and dtype, for tests/benchmarks."""
        raise NotImplementedError

    def arch(self) -> dict[str, Any]:
        """``{"kind": ..., **constructor kwargs}`` with JSON-friendly values.

        ``bigopt.models.from_arch(model.arch())`` rebuilds the same architecture, which is what
        an architecture-search stage stores per trial.
        """
        raise NotImplementedError

    def _param_device(self) -> torch.device:
        return next(self.parameters()).device

    def _init_weights(self) -> None:
        """Initialization beyond each layer's default, run once the layers exist (none here).

        Overrides must set parameters only through ``_init_param``, so that the same code
        initializes a ZeRO-3 partitioned model, and must not read parameter values.
        """

    def _init_param(self, param: Tensor, init: Callable[[Tensor], Any]) -> None:
        """Apply an in-place initializer, e.g. ``lambda t: nn.init.normal_(t, std=0.02)``.

        A plain parameter: exactly ``init(param)``. A ZeRO-3 partitioned one: ``init`` draws into
        a full-size CPU tensor of the default dtype (the same numbers as a plain build) and the
        result is copied into the gathered parameter, rounded to its dtype. A collective then:
        every rank must call it in the same order, as ``__init__`` does.
        """
        if not is_partitioned(param):
            init(param)
            return
        replay = self.__dict__.get("_partitioned_init")
        if replay is not None:
            replay.init_param(param, init)
        else:  # outside __init__ (a re-initialization)
            _init_partitioned(param, init, _cpu_tensor(full_numel(param)).view(full_shape(param)))

    def _finish_init(self, rng: RngSnapshot) -> None:
        """Last step of ``__init__``; ``rng`` was taken before the first layer was built.

        A plain build runs ``_init_weights``. A build under ``deepspeed.zero.Init`` replays the
        whole initialization of a plain build (``_PartitionedInit``), so the same seed gives
        the same weights, and leaves the CPU RNG where a plain build leaves it.
        """
        if not any(is_partitioned(p) for p in self.parameters()):
            self._init_weights()
            return
        self._partitioned_init = _PartitionedInit(self, rng)
        try:
            self._partitioned_init.run()
        finally:
            del self._partitioned_init
        # zero.Init also made floating buffers (BatchNorm statistics) the training dtype; a plain
        # build has them in the default dtype, and DeepSpeed casts the buffers of either only if
        # the config asks for it (buffer_dtype).
        for module in self.modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf.is_floating_point() and buf.dtype != torch.get_default_dtype():
                    setattr(module, name, buf.to(torch.get_default_dtype()))

    def _forward_flops_per_sample(self) -> float:
        """``count_forward_flops`` on a batch of one.

        A ZeRO-3 partitioned model cannot run a forward pass outside its engine, so the same
        architecture is rebuilt on the meta device (``arch()``; no memory, no collective) and
        measured there. The example batch is still drawn on the CPU so that both cases use the
        RNG alike. Call it outside ``deepspeed.zero.Init``, which would partition the copy.
        """
        if not any(is_partitioned(p) for p in self.parameters()):
            x, _ = self.example_input(1, device=self._param_device())
            return count_forward_flops(self, x)
        x, _ = self.example_input(1, device="cpu")
        config = {k: v for k, v in self.arch().items() if k != "kind"}
        with torch.device("meta"):
            twin = type(self)(**config)
        return count_forward_flops(twin, x.to("meta"))


def check_config_keys(cls: type, config: Mapping[str, Any], *, what: str) -> None:
    """Raise ValueError naming every key of ``config`` that ``cls.__init__`` does not accept.

    Done up front so a typo in a YAML spec reads as a config error, not as a TypeError from
    deep inside a Ray worker.
    """
    allowed = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ValueError(
            f"unknown config key(s) for {what}: {', '.join(map(repr, unknown))}; "
            f"allowed keys are: {', '.join(allowed)}"
        )


def require_positive_int(name: str, value: Any) -> int:
    """Validate a size-like hyperparameter with a message that names it."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def require_dropout(value: Any) -> float:
    """Validate a dropout probability in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {value!r}")
    return float(value)


def count_forward_flops(model: nn.Module, x: Tensor) -> float:
    """Forward FLOPs of ``model(x)`` per sample: 2 x multiply-adds of every Conv2d and Linear.

    Measured with forward hooks on one dummy batch rather than derived by hand, so it stays
    right for any block list an architecture search produces. Norms, activations, pooling and
    bias adds are ignored, as in the usual MFU convention. The caller passes a batch of one.
    """
    macs = 0

    def hook(module: nn.Module, _inputs: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            k_h, k_w = module.kernel_size
            macs += out.numel() * (module.in_channels // module.groups) * k_h * k_w
        elif isinstance(module, nn.Linear):
            macs += out.numel() * module.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    was_training = model.training
    try:
        # eval() so BatchNorm running statistics are not touched by the dummy batch
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return 2.0 * macs / x.shape[0]
