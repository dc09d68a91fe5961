"""A reinforcement-learning controller (Zoph & Le 2017; NNI's policy-gradient strategy) as a
Tune ``Searcher``.

A small policy network emits one decision per searchable ``Dim``, autoregressively: the input
at step ``i`` is the decision taken at step ``i - 1`` (a start token at step 0), so later
choices can depend on earlier ones. Two policies: an ``nn.LSTMCell`` (the original
controller) and a small causal ``nn.TransformerEncoder`` over the same token sequence.

Choices per dim (``choices_for``): a categorical dim's categories; an integer or float range
is cut into at most ``bins`` evenly spaced values between its bounds, endpoints included (in
log space for log domains), passed through the dim's own quantization and de-duplicated, so
a quantized or small integer range gives exactly its distinct grid points. A policy-gradient
controller needs a finite action set, and 8 values span a range finely enough for the
coarse early search RL is used for.

Learning is REINFORCE after every completed trial (batch of one, as Tune delivers trials one
at a time; the policy the next suggestion comes from has seen every result so far):

* reward: the trial's ``score()`` (larger is better);
* advantage: ``(reward - baseline) / std``, the baseline an exponential moving average of the
  rewards (``baseline_decay``) and ``std`` a moving average of the squared deviations with
  the same decay; the division makes one learning rate fit accuracies in percent (~70-95) and
  toy objectives (~0-1) alike; clipped to ``+-advantage_clip``;
* loss: ``-advantage * log p(decisions) - entropy_weight * entropy``, Adam with ``lr``.

The first completed trial only starts the baseline (no update: its advantage would be 0).
A failed trial (``error=True``, or no metric) is not a reward and changes nothing: giving it
"the worst reward seen" would teach the policy about crashes, not about the objective.

Randomness: decisions are drawn from the searcher's own NumPy generator (inverse CDF on the
policy's probabilities in float64), the one generator ``_SeededSearcher`` already saves, and
the policy is initialised under ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``
so Torch's global generator is untouched; all policy arithmetic runs on one CPU thread (the
global thread count restored after), so the same seed gives the same suggestions when
trials complete in the same order. ``get_state`` holds the policy's weights, Adam's state and
the baseline as base64 of the raw tensor bytes (JSON, no pickle): restoring resumes
bit-for-bit.
"""

from __future__ import annotations

import base64
import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from ray.tune.search.sample import Categorical, Integer
from torch import nn

from bigopt.search.searchers import _SeededSearcher
from bigopt.search.space import Dim


def choices_for(dim: Dim, bins: int = 8) -> list[Any]:
    """The finite action set of one dim (see the module docstring)."""
    d = dim.domain
    if isinstance(d, Categorical):
        return list(d.categories)
    if bins < 2:
        raise ValueError(f"bins: {bins} must be at least 2")
    if isinstance(d, Integer):
        grid = np.linspace(d.lower, d.upper - 1, bins)  # randint's upper bound is exclusive
        raw = [dim._quantize(int(round(x))) for x in grid]
    else:
        lo, hi = dim._bounds()
        # exp(log(x)) can land a hair outside the range: clamp before quantizing
        raw = [dim._quantize(min(max(dim._from_unit(float(u)), d.lower), d.upper))
               for u in np.linspace(lo, hi, bins)]
    out: list[Any] = []
    for value in raw:
        if value not in out:
            out.append(value)
    return out


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the policy on one thread: identical arithmetic whatever the machine's core count,
    and no oversubscription next to Tune's workers. The global setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Policy(nn.Module):
    """Embeds decision tokens and emits, per step, logits over that step's choices."""

    def __init__(self, sizes: list[int], hidden: int, kind: str, layers: int, heads: int,
                 tanh_constant: float | None):
        super().__init__()
        self.sizes, self.kind, self.tanh_constant = sizes, kind, tanh_constant
        # token 0 is "start"; dim i's choices are tokens offsets[i] + 1 .. offsets[i] + sizes[i]
        self.offsets = [int(x) for x in np.cumsum([0, *sizes[:-1]])]
        self.embed = nn.Embedding(1 + sum(sizes), hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in sizes)
        if kind == "lstm":
            self.cell = nn.LSTMCell(hidden, hidden)
        elif kind == "transformer":
            self.position = nn.Embedding(len(sizes), hidden)
            layer = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=0.0,
                                               batch_first=True, norm_first=True)
            # the final LayerNorm bounds the heads' input, as the LSTM's tanh does
            self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(hidden),
                                                 enable_nested_tensor=False)
        else:
            raise ValueError(f"policy: {kind!r} must be 'lstm' or 'transformer'")

    def tokens(self, actions: list[int]) -> torch.Tensor:
        """The input sequence for ``actions``: start, then each decision but the last."""
        ids = [0] + [self.offsets[i] + 1 + a for i, a in enumerate(actions[: len(self.sizes) - 1])]
        return torch.tensor(ids, dtype=torch.long)

    def logits(self, actions: list[int]) -> list[torch.Tensor]:
        """Logits for steps ``0 .. len(actions)`` given the decisions so far (teacher forcing)."""
        steps = min(len(actions) + 1, len(self.sizes))
        x = self.embed(self.tokens(actions)[:steps])
        if self.kind == "lstm":
            h = c = torch.zeros(1, x.shape[-1])
            outs = []
            for t in range(steps):
                h, c = self.cell(x[t : t + 1], (h, c))
                outs.append(h[0])
            hidden = torch.stack(outs)
        else:
            x = x + self.position(torch.arange(steps))
            mask = nn.Transformer.generate_square_subsequent_mask(steps)
            hidden = self.encoder(x.unsqueeze(0), mask=mask, is_causal=True)[0]
        return [self._head(t, hidden[t]) for t in range(steps)]

    def _head(self, step: int, hidden: torch.Tensor) -> torch.Tensor:
        """Step ``step``'s logits from the hidden state (any leading batch shape)."""
        out = self.heads[step](hidden)
        if self.tanh_constant is not None:  # ENAS: logits in +-c, so no choice's odds run away
            out = self.tanh_constant * torch.tanh(out / self.tanh_constant)
        return out

    def batch_log_prob_entropy(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sequence of complete decisions: log p(decisions) and the summed per-step
        entropy, as tensors of shape (len(batch),) (the LSTM runs the batch at once)."""
        if self.kind != "lstm":
            pairs = [self.log_prob_entropy(actions) for actions in batch]
            return torch.stack([p for p, _ in pairs]), torch.stack([e for _, e in pairs])
        tokens = torch.stack([self.tokens(actions) for actions in batch])  # (B, steps)
        x = self.embed(tokens)
        h = c = torch.zeros(len(batch), x.shape[-1])
        chosen = torch.tensor(batch, dtype=torch.long)
        log_prob = torch.zeros(len(batch))
        entropy = torch.zeros(len(batch))
        for t in range(len(self.sizes)):
            h, c = self.cell(x[:, t], (h, c))
            logp = torch.log_softmax(self._head(t, h), -1)
            log_prob = log_prob + logp.gather(1, chosen[:, t : t + 1])[:, 0]
            entropy = entropy - (logp.exp() * logp).sum(-1)
        return log_prob, entropy

    def log_prob_entropy(self, actions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(actions) under the policy and its summed per-step entropy."""
        log_prob = torch.zeros(())
        entropy = torch.zeros(())
        for step, a in zip(self.logits(actions[:-1]), actions, strict=True):
            logp = torch.log_softmax(step, -1)
            log_prob = log_prob + logp[a]
            entropy = entropy - (logp.exp() * logp).sum()
        return log_prob, entropy

    def stepwise(self, actions: list[int]) -> Iterator[torch.Tensor]:
        """The logits of each step in turn while the caller appends its decision to
        ``actions`` between steps. The LSTM carries its state (one cell step per decision,
        the same arithmetic as ``logits``); the Transformer re-reads the prefix."""
        if self.kind != "lstm":
            for _ in self.sizes:
                yield self.logits(actions)[-1]
            return
        h = c = torch.zeros(1, self.embed.embedding_dim)
        for t in range(len(self.sizes)):
            token = 0 if t == 0 else self.offsets[t - 1] + 1 + actions[t - 1]
            h, c = self.cell(self.embed(torch.tensor([token])), (h, c))
            yield self._head(t, h[0])


def _encode(obj: Any) -> Any:
    """Tensors -> ``{"tensor": base64 of the raw bytes, "dtype", "shape"}``, recursively."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        return {"tensor": base64.b64encode(t.numpy().tobytes()).decode(), "dtype": str(t.numpy().dtype),
                "shape": list(t.shape)}
    if isinstance(obj, dict):
        return {"keys": [_encode(k) for k in obj], "values": [_encode(v) for v in obj.values()]}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict) and "tensor" in obj:
        array = np.frombuffer(base64.b64decode(obj["tensor"]), dtype=obj["dtype"])
        return torch.from_numpy(array.reshape(obj["shape"]).copy())
    if isinstance(obj, dict):
        return {_decode(k): _decode(v) for k, v in zip(obj["keys"], obj["values"], strict=True)}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


class RLSearcher(_SeededSearcher):
    """Policy-gradient (REINFORCE) controller over the space's dims; see the module docstring.

    ``policy``: "lstm" or "transformer"; ``hidden``: width of either; ``layers``/``heads``: the
    transformer's depth and attention heads; ``bins``: values per integer/float dim;
    ``lr``: Adam's step; ``entropy_weight``: bonus that keeps the policy from collapsing onto
    one config early; ``baseline_decay``: EMA decay of the reward baseline and of its spread;
    ``advantage_clip``: bound on one trial's normalised advantage; ``tanh_constant``: if set,
    logits are squashed to ``+-tanh_constant`` (ENAS), capping any choice's odds.
    ``candidates`` > 1: that many samples per suggestion, of which the one
    ``bigopt.search.surrogate.DensityRatio`` ranks first is tried (predictor-guided sampling).
    ``dedupe`` (default on): a sampled point already tried (by ``canonical``, as for
    ``EvolutionSearcher``) is sampled again, up to ``MAX_REDRAWS`` times: as the policy sharpens
    it re-draws its favourites, and re-training a known point spends a trial on nothing
    (6.2 of 30 trials were repeats on the Fashion-MNIST table, BENCHMARKS.md 6b).

    ``update``: "reinforce" (the module docstring's rule), "risk_seeking" (only trials above
    the ``1 - risk_quantile`` quantile of the rewards so far are reinforced, against that
    quantile: Petersen et al., ICLR 2021) or "pqt" (a maximum-likelihood step on the
    ``top_k`` best trials after every result: Abolafia et al. 2018). Neither beat REINFORCE
    on NAS-Bench-201 (PQT was worse: its policy collapses onto the queue); see
    benchmarks/results/nasbench201_surrogate_tuning.md, session 20. ``fresh``: how many of the
    ``candidates`` are whole points drawn from the good trials' density instead of the policy
    (as ``EvolutionSearcher``'s); the policy learns from whichever is tried. ``reevaluate``,
    ``reevaluate_top``, ``seed_key``, ``budget``: as ``EvolutionSearcher``'s (the last trials
    re-train the best challengers with new seeds; the policy does not learn from them).

    Defaults were chosen on NAS-Bench-201 (3 data sets, 100 queries) with seeds 100-104, not
    the seeds benchmarks report (benchmarks/results/nasbench201.md): entropy weight 0.05 beat
    0.01 and 0 for both policies; the Transformer needs a smaller step than the LSTM (at 0.01
    it collapsed onto one config within ~10 trials), hence a per-policy ``lr`` default.
    """

    DEFAULT_LR = {"lstm": 0.01, "transformer": 0.003}

    def __init__(self, space: dict[str, Any] | None = None, metric: str | None = None,
                 mode: str | None = None, *, seed: int = 0,
                 max_trials: int | None = None, policy: str = "lstm", hidden: int = 32, layers: int = 1,
                 heads: int = 2, bins: int = 8, lr: float | None = None, entropy_weight: float = 0.05,
                 baseline_decay: float = 0.9, advantage_clip: float = 3.0,
                 tanh_constant: float | None = None,
                 canonical: Callable[[dict[str, Any]], Any] | None = None, dedupe: bool = True,
                 candidates: int = 1, update: str = "reinforce", risk_quantile: float = 0.2,
                 top_k: int = 10, fresh: int = 0, reevaluate: int = 0, reevaluate_top: int = 2,
                 seed_key: str | None = None, budget: int | None = None):
        # the space (given here or by the Tuner) is set last: the policy is built from it
        super().__init__(None, metric, mode, seed=seed, max_trials=max_trials,
                         candidates=candidates, reevaluate=reevaluate,
                         reevaluate_top=reevaluate_top, seed_key=seed_key, budget=budget)
        self.canonical = (canonical or (lambda config: config)) if dedupe else None
        if not 0.0 <= baseline_decay < 1.0:
            raise ValueError(f"baseline_decay: {baseline_decay} must be in [0, 1)")
        if policy not in ("lstm", "transformer"):
            raise ValueError(f"policy: {policy!r} must be 'lstm' or 'transformer'")
        if update not in self.UPDATES:
            raise ValueError(f"update: {update!r} must be one of {', '.join(self.UPDATES)}")
        if not 0.0 < risk_quantile <= 1.0:
            raise ValueError(f"risk_quantile: {risk_quantile} must be in (0, 1]")
        if top_k < 1:
            raise ValueError(f"top_k: {top_k} must be >= 1")
        if not 0 <= fresh < candidates:
            raise ValueError(f"fresh: {fresh} must be between 0 and candidates - 1 = {candidates - 1}")
        self.update, self.risk_quantile, self.top_k, self.fresh = update, risk_quantile, top_k, fresh
        lr = lr if lr is not None else self.DEFAULT_LR.get(policy, 0.01)
        self.lr, self.entropy_weight = lr, entropy_weight
        self.baseline_decay, self.advantage_clip = baseline_decay, advantage_clip
        self._shape = {"bins": bins, "hidden": hidden, "policy": policy, "layers": layers,
                       "heads": heads, "tanh_constant": tanh_constant}
        self.actions: dict[str, list[int]] = {}  # live trial -> its decisions
        self.baseline: float | None = None
        self.spread = 0.0  # moving average of (reward - baseline) ** 2
        self.updates = 0
        if space:
            self._set_space(space)

    def _on_space(self) -> None:
        assert self.space is not None
        p = self._shape
        self.choices = [choices_for(dim, p["bins"]) for dim in self.space.dims]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.policy = _Policy([len(c) for c in self.choices], p["hidden"], p["policy"],
                                  p["layers"], p["heads"], p["tanh_constant"])
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.lr)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = super().suggest(trial_id)
        # a re-evaluation re-trains a known point: not a policy sample, nothing to learn from
        if isinstance(config, dict) and trial_id not in self.reevaluating:
            self.actions[trial_id] = self._last_actions
        return config

    def _next_config(self) -> dict[str, Any]:
        density = self._density() if self.candidates > 1 else None
        fresh = self.fresh if density is not None else 0
        options = []
        for _ in range(self.candidates - fresh):
            config = self._unseen(self._sample(), lambda _: self._sample())  # tried: ask again
            options.append((config, self._last_actions))
        for _ in range(fresh):  # whole points from the good trials' density, ranked beside them
            config = self._unseen(density.sample(self.rng), lambda _: density.sample(self.rng))
            options.append((config, self._actions_of(config)))
        # the policy learns from the actions of the sample that is tried
        config, self._last_actions = self._choose(options, lambda option: option[0], density)
        return config

    def _actions_of(self, config: dict[str, Any]) -> list[int] | None:
        """The policy's decisions that produce ``config``; None if a value is off its grid."""
        try:
            return [self.choices[i].index(config[dim.path]) for i, dim in enumerate(self.space.dims)]
        except (KeyError, ValueError):
            return None

    def _sample(self) -> dict[str, Any]:
        actions: list[int] = []
        with _one_thread(), torch.no_grad():
            for step in self.policy.stepwise(actions):
                probs = torch.softmax(step.double(), -1).numpy()
                cdf = np.cumsum(probs)
                pick = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
                actions.append(min(pick, len(probs) - 1))
        self._last_actions = actions
        values = {dim.path: self.choices[i][a] for i, (dim, a) in enumerate(zip(self.space.dims, actions,
                                                                               strict=True))}
        return {**self.space.constants, **values}

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        known = trial_id in self.live
        super().on_trial_complete(trial_id, result, error)
        actions = self.actions.pop(trial_id, None)
        if not known or actions is None or self.history[-1][1] is None:
            return
        reward = float(self.history[-1][1])
        if self.update != "reinforce":
            self._elite_update(reward, actions)
            return
        if self.baseline is None:
            self.baseline = reward
            return
        deviation = reward - self.baseline
        # the spread starts at the first deviation, so the first update's advantage is +-1
        self.spread = deviation**2 if self.updates == 0 else self.spread
        advantage = deviation / math.sqrt(self.spread + 1e-12) if self.spread > 0 else 0.0
        advantage = max(-self.advantage_clip, min(self.advantage_clip, advantage))
        self._update(actions, advantage)
        d = self.baseline_decay
        self.baseline = d * self.baseline + (1 - d) * reward
        self.spread = d * self.spread + (1 - d) * deviation**2
        self.updates += 1

    def adopt(self, trial_id: str, config: dict[str, Any]) -> None:
        super().adopt(trial_id, config)
        # the policy learns from the actions that produce the trial's real config; nothing
        # from a point off its choices
        actions = self._actions_of(config)
        if actions is None or trial_id in self.reevaluating:  # a re-evaluation teaches nothing
            self.actions.pop(trial_id, None)
        else:
            self.actions[trial_id] = actions

    def _update(self, actions: list[int], advantage: float) -> None:
        with _one_thread():
            log_prob, entropy = self.policy.log_prob_entropy(actions)
            loss = -advantage * log_prob - self.entropy_weight * entropy
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()

    def _elite_update(self, reward: float, actions: list[int]) -> None:
        """``update: risk_seeking`` (Petersen et al., ICLR 2021): the baseline is the
        ``1 - risk_quantile`` quantile of the rewards so far and only a trial above it is
        reinforced, so the policy chases the best case, which is what a search keeps.
        ``update: pqt`` (priority queue training, Abolafia et al. 2018): one maximum-likelihood
        step on the ``top_k`` best trials so far, whatever the new trial scored. Both read the
        completed trials from ``history`` (the new one included)."""
        scored = [(score, c) for c, score in self.history if score is not None]
        if self.update == "risk_seeking":
            if len(scored) < 2:
                return
            rewards = np.array([score for score, _ in scored])
            threshold = float(np.quantile(rewards, 1.0 - self.risk_quantile))
            spread = float(rewards.std())
            if reward <= threshold or spread <= 0:
                return
            self._update(actions, min(self.advantage_clip, (reward - threshold) / spread))
            self.updates += 1
            return
        best_first = sorted(scored, key=lambda pair: -pair[0])
        queue = [a for a in (self._actions_of(c) for _, c in best_first) if a is not None][: self.top_k]
        with _one_thread():
            log_prob, entropy = self.policy.batch_log_prob_entropy(queue)
            loss = -(log_prob + self.entropy_weight * entropy).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        self.updates += 1

    UPDATES = ("reinforce", "risk_seeking", "pqt")
    STATE = (*_SeededSearcher.STATE, "actions", "baseline", "spread", "updates")

    def get_state(self) -> dict[str, Any]:
        return {**super().get_state(), "policy": _encode(self.policy.state_dict()),
                "optimizer": _encode(self.optimizer.state_dict())}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self.policy.load_state_dict(_decode(state["policy"]))
        self.optimizer.load_state_dict(_decode(state["optimizer"]))
