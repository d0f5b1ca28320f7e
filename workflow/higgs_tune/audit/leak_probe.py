"""The leak probe: the loss wiring and the model's causality, checked on a real batch by perturbing one input.

With a correct shift, the target at ``t`` is scored from the logits at ``t - 1``, which cannot see
the input at ``t``: changing the input token at ``t`` (text) or the input code column
``audio_out_ids[:, i]`` (audio) must leave that target's loss unchanged (``no_leak``), must change
the loss of the target at ``t + 1`` / column ``i + 1`` (``next_token`` / ``next_code``: scored from
the perturbed position), and must leave every logit before ``t`` unchanged (``causal_logits``). A
label planted at the first column of a segment must not be a target (``segment_boundary``).

A *loss wiring* is any callable with the signature of :func:`higgs_tune.loss.higgs_loss`
(``logits, expanded_labels, audio_logits, label_audio_ids, audio_out_ids_start``) returning an
object with ``text_loss``, ``codebook_losses`` ``(K,)``, ``n_text_targets`` and
``n_codebook_targets`` ``(K,)``. The probe gets the per-target view of a wiring without trusting
it: it keeps one label and sets every other label to the ignore index, so the wiring's loss *is* the
term of that single target, and its target count says whether the wiring counts it at all.

The probe runs as named steps (:class:`_ProbeRun`): baseline forward, output shapes, full-batch
target counts, the text probe, the segment-boundary probe, the audio probe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import torch

from ..data import batch_to_model_kwargs
from ..loss import count_targets, forward_loss, higgs_loss
from ..labels import IGNORE_INDEX
from .expect import Expect, SampleMeta
from .rules import Failure

#: The loss weights the probe runs the loss with. It reads only the unweighted terms (``text_loss``,
#: ``codebook_losses``, the target counts), never ``HiggsLoss.loss``, the only value the weights
#: (``train.text_weight``, ``train.audio_weight``) change; so the audit, which does not read the train
#: section, passes 1 and 1 and its outcome holds for any weights.
UNWEIGHTED = {"text_weight": 1.0, "audio_weight": 1.0}


@functools.wraps(higgs_loss)
def _production_wiring(*args, **kwargs):
    """``loss.higgs_loss`` with the weights of :data:`UNWEIGHTED` (the probe calls a wiring with the five
    tensors alone)."""
    return higgs_loss(*args, **UNWEIGHTED, **kwargs)


@dataclasses.dataclass
class _Probe:
    """Collects probe check outcomes (one entry per check) and failures."""

    failures: list[Failure] = dataclasses.field(default_factory=list)
    checks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    evaluated: set[str] = dataclasses.field(default_factory=set)

    def record(self, rule: str, ok: bool, sample_id: str, message: str, cause: str | None = None, **detail):
        self.evaluated.add(rule)
        self.checks.append({"rule": rule, "passed": bool(ok), "sample_id": sample_id, "message": message, **detail})
        if not ok:
            self.failures.append(Failure(rule, sample_id, message, cause))


#: The text probe's replacement token (an ordinary Llama-3 text token; the next id when the input already is it).
_SWAP_TOKEN = 1000


class _WiringRaised(Exception):
    """The loss wiring raised (already recorded as a ``probe_loss_runs`` failure): end the current step."""


def _forward(model, batch, device) -> Any:
    kw = batch_to_model_kwargs(batch, device)
    with torch.no_grad():
        return model(**kw)


def _wrapper_cause(model, exc: BaseException | None) -> str | None:
    """The likely cause when a peft ``CAUSAL_LM`` wrapper (or a forward that takes ``labels``) is at fault."""
    names = [type(model).__name__]
    with contextlib.suppress(Exception):
        names.append(type(model.base_model).__name__)
    if "PeftModelForCausalLM" in names or (exc is not None and "labels" in str(exc)):
        return ("peft LoraConfig(task_type='CAUSAL_LM') wraps the model in PeftModelForCausalLM, whose forward passes "
                "labels=... and drops Higgs' audio_out_ids/label_audio_ids path; build LoraConfig without task_type "
                "(model.apply_lora)")
    return None


def _clone_batch(batch):
    """A copy of a ``HiggsAudioBatchInput`` whose tensors can be modified."""
    return dataclasses.replace(batch, **{f.name: (getattr(batch, f.name).clone()
                                                  if isinstance(getattr(batch, f.name), torch.Tensor) else
                                                  getattr(batch, f.name)) for f in dataclasses.fields(batch)})


def _max_change(new: torch.Tensor, old: torch.Tensor, b: int, t: int, attended: torch.Tensor | None) -> float:
    """Largest |change| of logits ``[b, :t]`` over attended positions.

    Left-padding positions (batch of 1) are skipped: their queries see no unmasked key, so eager
    attention spreads them uniformly over the whole row; they carry no label and no later query
    attends to them.
    """
    if t <= 0:
        return 0.0
    d = (new[b, :t] - old[b, :t]).abs().amax(-1)
    if attended is not None:
        d = d[attended[b, :t].to(d.device)]
    return float(d.max()) if d.numel() else 0.0


def _other_rows_change(new: torch.Tensor, old: torch.Tensor, b: int) -> float:
    """Largest |change| of the logits of every batch row but ``b`` (0 for a batch of one)."""
    others = [r for r in range(old.shape[0]) if r != b]
    return float((new[others] - old[others]).abs().max()) if others else 0.0


class _ProbeRun:
    """One probe of ``model`` + ``wiring`` on ``batch``; :meth:`run` performs the steps in order."""

    def __init__(self, model, batch, sids: list[str], expect: Expect, wiring: Callable | None, tol: float, device):
        self.model, self.batch, self.sids, self.expect, self.tol, self.device = model, batch, sids, expect, tol, device
        self.production = wiring is None
        self.wiring = _production_wiring if wiring is None else wiring
        self.P = _Probe()
        self.K, self.C = expect.K, expect.codebook_size + 2
        self.info: dict[str, Any] = {
            "batch_size": int(batch.input_ids.shape[0]), "sample_ids": list(sids), "tolerance": tol,
            "wiring": getattr(self.wiring, "__qualname__", type(self.wiring).__name__), "model": type(model).__name__}
        with contextlib.suppress(StopIteration, AttributeError, TypeError):
            self.info["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
        label_a = batch.label_audio_ids
        self.has_audio = label_a is not None and label_a.numel() > 0
        self.n_cols = int(label_a.shape[1]) if self.has_audio else 0
        # one perturbed forward per modality: the text probe on row 0, the audio probe on row 1 (row 0 when
        # B == 1); each forward also checks that the other rows' logits do not move
        self.b_text, self.b_audio = 0, (1 if self.info["batch_size"] > 1 else 0)

    # ------------------------------------------------------------------------------------ steps
    def run(self) -> dict[str, Any]:
        """All steps; a step that cannot go on ends the probe (its failure is recorded)."""
        if not (self.baseline() and self.check_shapes() and self.check_counts()):
            return self.info
        try:
            self.info["text"] = self.text_probe()
        except _WiringRaised:
            self.info["text"] = []
        if not (self.has_audio and self.audio_ok):
            return self.info
        with contextlib.suppress(_WiringRaised):
            self.boundary_probe()
        with contextlib.suppress(_WiringRaised):
            self.info["audio"] = self.audio_probe()
        return self.info

    def baseline(self) -> bool:
        """The unperturbed forward (through ``loss.forward_loss``, the training entry point, for the
        production wiring). Records ``probe_model_forward``, and ``probe_loss_runs`` when only the
        production loss failed."""
        self.prod_loss, prod_exc, out0 = None, None, None
        if self.production:
            try:
                with torch.no_grad():
                    out0, self.prod_loss = forward_loss(self.model, self.batch, self.device, **UNWEIGHTED)
            except Exception as exc:  # noqa: BLE001 - re-run the bare forward to tell model from loss failures
                prod_exc = exc
        try:
            if out0 is None:
                out0 = _forward(self.model, self.batch, self.device)
            self.logits, self.exp_labels, self.exp_ids = out0.logits, out0.expanded_labels, out0.expanded_input_ids
            self.a_logits, self.a_mask = out0.audio_logits, out0.audio_out_mask
            am = getattr(out0, "attention_mask", None)
            self.attended = am.bool() if am is not None else None
        except Exception as exc:  # noqa: BLE001 - the gate reports, never crashes
            self.P.record("probe_model_forward", False, "*", f"forward raised {type(exc).__name__}: {exc}",
                          _wrapper_cause(self.model, exc))
            return False
        self.P.record("probe_model_forward", True, "*", "forward ran")
        if prod_exc is not None:
            self.P.record("probe_loss_runs", False, "*", f"loss.forward_loss (the training entry point) raised "
                          f"{type(prod_exc).__name__}: {prod_exc}", _wrapper_cause(self.model, None))
        return True

    def check_shapes(self) -> bool:
        """``shapes_text`` (required to go on) and ``shapes_audio`` (sets ``audio_ok``)."""
        logits, exp_labels, a_logits, label_a = self.logits, self.exp_labels, self.a_logits, self.batch.label_audio_ids

        def shape(x: torch.Tensor | None):
            return None if x is None else tuple(x.shape)

        ok = exp_labels is not None and shape(exp_labels) == tuple(logits.shape[:2])
        self.P.record("shapes_text", ok, "*", f"expanded_labels {shape(exp_labels)}, logits {shape(logits)}")
        if not ok:
            return False
        n, K, C = self.n_cols, self.K, self.C
        self.audio_ok = (not self.has_audio) or (a_logits is not None and a_logits.dim() == 3
                                                 and a_logits.shape[0] == n > 0 and shape(a_logits)[1:] == (K, C))
        self.P.record("shapes_audio", self.audio_ok, "*", f"audio_logits {shape(a_logits)} for label_audio_ids "
                      f"{shape(label_a)} (expected ({n}, {K}, {C}))",
                      _wrapper_cause(self.model, None) if not self.audio_ok else None)
        self.info["expanded_length"] = int(logits.shape[1])
        self.info["audio_rows"] = n
        dev = self.dev = logits.device
        starts = self.batch.audio_out_ids_start
        self.lab_a = label_a.to(dev) if self.has_audio else None
        self.st = starts.to(dev) if starts is not None else torch.zeros(0, dtype=torch.long, device=dev)
        self.empty_al = torch.zeros((0, K, C), device=dev)
        self.empty_la = torch.zeros((K, 0), dtype=torch.long, device=dev)
        self.empty_st = torch.zeros(0, dtype=torch.long, device=dev)
        return True

    def check_counts(self) -> bool:
        """The wiring on the full batch (``probe_loss_runs``; required to go on), its loss against the
        production entry point's, and its target counts against ``loss.count_targets``
        (``probe_target_counts``)."""
        batch, with_audio = self.batch, self.audio_ok and self.has_audio
        ct = count_targets(batch.label_ids, batch.label_audio_ids if self.has_audio else None,
                             batch.audio_out_ids_start, num_codebooks=self.K)
        try:
            full = self.call(self.logits, self.exp_labels, self.a_logits if with_audio else self.empty_al,
                             self.lab_a if with_audio else self.empty_la, self.st if with_audio else self.empty_st)
        except _WiringRaised:
            return False
        self.P.record("probe_loss_runs", True, "*", "wiring ran on the full batch")
        if self.prod_loss is not None:
            d = max(abs(float(self.prod_loss.text_loss) - float(full.text_loss)),
                    float((self.prod_loss.codebook_losses.float() - full.codebook_losses.float()).abs().max()))
            self.P.record("probe_loss_runs", d <= self.tol, "*", f"loss.forward_loss (the training entry point) and "
                          f"the probed wiring differ by {d:.3g} on the same batch", "loss.forward_loss wires the model "
                          "outputs into higgs_loss differently from the probe (other outputs or label tensors)")
        n_expanded = int((self.exp_labels[:, 1:] != IGNORE_INDEX).sum())
        self.P.record("probe_target_counts", n_expanded == ct.text, "*", f"the model's expanded_labels hold "
                      f"{n_expanded} text targets, count_targets on the collated labels {ct.text}")
        if self.audio_ok:
            got_cb = [int(x) for x in full.n_codebook_targets]
            exp_cb = ct.codebooks.tolist() if self.has_audio else [0] * len(got_cb)
            ok = int(full.n_text_targets) == ct.text and got_cb == exp_cb
            self.P.record("probe_target_counts", ok, "*", f"wiring counts text {int(full.n_text_targets)}, codebooks "
                          f"{got_cb}; count_targets text {ct.text}, codebooks {exp_cb}")
        return True

    def text_probe(self) -> list[dict[str, Any]]:
        """Perturb one labeled text token of row ``b_text``: ``probe_text_no_leak``,
        ``probe_text_next_token``, ``probe_causal_logits``. Returns the probe's record (empty when
        the row has no candidate token or the perturbed forward failed)."""
        b, sids, P, tol = self.b_text, self.sids, self.P, self.tol
        j = self._text_candidate(b)
        if j is None:
            return []
        pert = _clone_batch(self.batch)
        old = int(self.batch.input_ids[b, j])
        pert.input_ids[b, j] = _SWAP_TOKEN if old != _SWAP_TOKEN else _SWAP_TOKEN + 1
        out1 = self._perturbed_forward(pert, sids[b])
        if out1 is None:
            return []
        diff = (out1.expanded_input_ids != self.exp_ids).nonzero()
        if diff.shape[0] != 1 or int(diff[0, 0]) != b:
            P.record("probe_causal_logits", False, sids[b], f"changing token {j} changed {diff.shape[0]} expanded "
                     f"positions (expected 1): the merge of text and audio positions depends on the token")
            return []
        t = int(diff[0, 1])
        lg0, lg1 = self.logits[b:b + 1], out1.logits[b:b + 1]
        target = int(self.exp_labels[b, t])
        a0, a1 = self.text_term(lg0, t, target), self.text_term(lg1, t, target)
        d_leak = abs(a1[0] - a0[0])
        rec = {"position": t, "collated_position": j, "target": target, "delta_target_t": d_leak}
        if a0[1] != 1:
            P.record("probe_target_counts", False, sids[b], f"one valid text label at position {t} gave "
                     f"{a0[1]} targets (expected 1)")
        else:
            P.record("probe_text_no_leak", d_leak <= tol, sids[b],
                     f"changing the input token at expanded position {t} moved the loss of the target at {t} by "
                     f"{d_leak:.3g} (tolerance {tol:g})")
        if t + 1 < self.exp_labels.shape[1]:
            nv = int(self.exp_labels[b, t + 1])
            nxt_id = int(self.exp_ids[b, t + 1])
            nv = nv if nv != IGNORE_INDEX else nxt_id if nxt_id < self.logits.shape[-1] else 0
            with contextlib.suppress(_WiringRaised):  # recorded; the causality check below needs no wiring
                n0, n1 = self.text_term(lg0, t + 1, nv), self.text_term(lg1, t + 1, nv)
                d_next = abs(n1[0] - n0[0])
                rec["delta_target_t_plus_1"] = d_next
                P.record("probe_text_next_token", n0[1] == 1 and d_next > tol, sids[b],
                         f"changing the input token at {t} moved the loss of the target at {t + 1} by {d_next:.3g} "
                         f"({n0[1]} targets counted; it must move: that target is predicted from position {t})")
        # causality: logits before t in row b and every other row unchanged
        d_prev = _max_change(out1.logits, self.logits, b, t, self.attended)
        d_other = _other_rows_change(out1.logits, self.logits, b)
        rec.update(delta_logits_before=d_prev, delta_logits_other_rows=d_other)
        P.record("probe_causal_logits", d_prev <= tol and d_other <= tol, sids[b],
                 f"text logits before {t} moved by {d_prev:.3g}, other samples' by {d_other:.3g}")
        return [rec]

    def boundary_probe(self) -> None:
        """``probe_audio_segment_boundary``: a label planted at a segment's first column is never a target."""
        st_list = self._segment_bounds()
        for s, s0 in enumerate(st_list[:-1]):
            if st_list[s + 1] - s0 < 1:
                continue
            r = self.audio_term(self.a_logits, 0, s0, 0)
            self.P.record("probe_audio_segment_boundary", r[1] == 0, "*", f"a label planted at the first column ({s0})"
                          f" of segment {s} counted as {r[1]} target(s) (expected 0)")

    def audio_probe(self) -> list[dict[str, Any]]:
        """Perturb one input column ``i`` of a target segment (preferably in row ``b_audio``):
        ``probe_audio_no_leak``, ``probe_audio_next_code``, ``probe_causal_logits``. Returns the
        probe's record (empty without a candidate segment or when the perturbed forward failed)."""
        st_list, a_pos = self._segment_bounds(), self.a_mask.nonzero()  # (N, 2) (row, position) per audio column
        N = self.n_cols
        row_of = (lambda c: int(a_pos[c, 0])) if a_pos.shape[0] == N else (lambda c: 0)
        valid_col = (self.lab_a != IGNORE_INDEX).any(0)
        cands = [s for s in range(len(st_list) - 1)
                 if st_list[s + 1] - st_list[s] >= 3 and bool(valid_col[st_list[s]:st_list[s + 1]].any())]
        if not cands:
            return []
        s = min(cands, key=lambda s: row_of(st_list[s]) != self.b_audio)
        s0, s1 = st_list[s], st_list[s + 1]
        b, sid = row_of(s0), self.sids[row_of(s0)]
        i = s0 + min(self.K + 1, s1 - s0 - 2)
        pert = _clone_batch(self.batch)
        col, cs = pert.audio_out_ids[:, i], self.expect.codebook_size
        pert.audio_out_ids[:, i] = (col % cs + cs // 2) % cs
        out1 = self._perturbed_forward(pert, sid)
        if out1 is None:
            return []
        al0, al1 = self.a_logits, out1.audio_logits
        leak_d, next_d, counted = [], [], []
        for k in range(self.K):
            v = int(self.lab_a[k, i])
            if v != IGNORE_INDEX:
                r0, r1 = self.audio_term(al0, k, i, v), self.audio_term(al1, k, i, v)
                counted.append(r0[1])
                leak_d.append(abs(r1[0] - r0[0]))
            nv = int(self.lab_a[k, i + 1])
            nv = nv if nv != IGNORE_INDEX else 0
            r0, r1 = self.audio_term(al0, k, i + 1, nv), self.audio_term(al1, k, i + 1, nv)
            next_d.append(abs(r1[0] - r0[0]) if r0[1] == 1 else 0.0)
        rec = {"segment": s, "column": i, "sample": sid, "delta_target_i": leak_d, "delta_target_i_plus_1": next_d}
        P, tol = self.P, self.tol
        if counted and min(counted) != 1:
            P.record("probe_target_counts", False, sid, f"one valid audio label at column {i} gave "
                     f"{counted} targets per codebook (expected 1)")
        if leak_d:
            P.record("probe_audio_no_leak", max(leak_d) <= tol, sid,
                     f"changing audio_out_ids[:, {i}] moved the loss of label column {i} by up to {max(leak_d):.3g} "
                     f"(tolerance {tol:g})")
        P.record("probe_audio_next_code", min(next_d) > tol, sid,
                 f"changing audio_out_ids[:, {i}] moved the loss of label column {i + 1} by at least {min(next_d):.3g} "
                 f"(it must move in every codebook: that column is predicted from audio_logits[{i}])")
        # causality: audio logits before i, other samples' audio rows, text logits before column i's position
        d_prev = float((al1[:i] - al0[:i]).abs().max()) if i > 0 else 0.0
        d_text = 0.0
        if a_pos.shape[0] == N:
            other = a_pos[:, 0] != b
            if bool(other.any()):
                d_prev = max(d_prev, float((al1[other] - al0[other]).abs().max()))
            d_text = _max_change(out1.logits, self.logits, b, int(a_pos[i, 1]), self.attended)
        d_other = _other_rows_change(out1.logits, self.logits, b)
        rec.update(delta_audio_logits_before=d_prev, delta_text_logits_before=d_text, delta_logits_other_rows=d_other)
        P.record("probe_causal_logits", max(d_prev, d_text, d_other) <= tol, sid,
                 f"audio logits before column {i} (and other samples' audio logits) moved by {d_prev:.3g}, text "
                 f"logits before it by {d_text:.3g}, other samples' text logits by {d_other:.3g}")
        return [rec]

    # ---------------------------------------------------------------------------------- helpers
    def call(self, *args, rule: str = "probe_loss_runs"):
        """The wiring's result on ``args``.

        Raises:
            _WiringRaised: after recording a ``rule`` failure, when the wiring raised.
        """
        try:
            return self.wiring(*args)
        except Exception as exc:  # noqa: BLE001
            self.P.record(rule, False, "*", f"loss wiring raised {type(exc).__name__}: {exc}")
            raise _WiringRaised from exc

    def text_term(self, lg_row: torch.Tensor, t: int, value: int) -> tuple[float, int]:
        """``(loss, n_targets)`` of the wiring's text term with the single label ``value`` at position ``t``."""
        labels = torch.full((1, self.exp_labels.shape[1]), IGNORE_INDEX, dtype=torch.long, device=self.dev)
        labels[0, t] = value
        r = self.call(lg_row, labels, self.empty_al, self.empty_la, self.empty_st)
        return float(r.text_loss), int(r.n_text_targets)

    def audio_term(self, al: torch.Tensor, k: int, i: int, value: int) -> tuple[float, int]:
        """``(loss, n_targets)`` of the wiring's codebook-``k`` term with the single label ``value`` at column ``i``."""
        la = torch.full_like(self.lab_a, IGNORE_INDEX)
        la[k, i] = value
        r = self.call(self.logits[:1, :2], torch.full((1, 2), IGNORE_INDEX, dtype=torch.long, device=self.dev),
                      al, la, self.st)
        return float(r.codebook_losses[k]), int(r.n_codebook_targets[k])

    def _segment_bounds(self) -> list[int]:
        """Segment starts plus the stream end, ``[s_0, ..., N]``."""
        return self.batch.audio_out_ids_start.tolist() + [self.n_cols]

    def _text_candidate(self, b: int) -> int | None:
        """A labeled text position (not audio, not the first) of row ``b`` to perturb, preferably one
        followed by another labeled text token (e.g. ``<|audio_eos|><|eot_id|>``)."""
        lab, ids = self.batch.label_ids, self.batch.input_ids
        cand = ((lab[b] != IGNORE_INDEX) & (ids[b] != self.expect.audio_out) & (ids[b] != self.expect.audio_in)
                & (torch.arange(ids.shape[1]) >= 1)).nonzero().flatten()
        if not cand.numel():
            return None
        nxt_lab = torch.zeros_like(cand, dtype=torch.bool)
        inb = cand + 1 < ids.shape[1]
        nxt_lab[inb] = lab[b, cand[inb] + 1] != IGNORE_INDEX
        return int(cand[nxt_lab][0]) if nxt_lab.any() else int(cand[-1])

    def _perturbed_forward(self, pert, sid: str):
        """The forward on a perturbed batch, or ``None`` after recording a ``probe_model_forward`` failure."""
        try:
            return _forward(self.model, pert, self.device)
        except Exception as exc:  # noqa: BLE001
            self.P.record("probe_model_forward", False, sid, f"perturbed forward raised {type(exc).__name__}: {exc}")
            return None


def leak_probe(model, batch, sample_ids: list[str], expect: Expect, *, wiring: Callable | None = None,
               tol: float, device: str | torch.device) -> dict[str, Any]:
    """Check the loss wiring and the model's causality on a real batch (see the module docstring).

    Args:
        model: ``HiggsAudioModel`` or a wrapper (peft); put in eval mode for the probe, restored after.
        batch: collated ``HiggsAudioBatchInput`` (batch size 1 is handled: forward then left-pads).
        sample_ids: ids of the batch's samples, for messages.
        expect: :class:`~higgs_tune.audit.expect.Expect`.
        wiring: the loss wiring under test (signature of ``loss.higgs_loss``). ``None`` is production:
            ``loss.higgs_loss``, with the base forward run through ``loss.forward_loss`` (the entry
            point training and evaluation call), whose loss must equal the probed wiring's.
        tol: absolute tolerance on loss / logit changes (``audit.leak_tolerance``).
        device: where the batch goes for the forward.

    Returns:
        ``{"passed", "checks": [...], "failures": [Failure...], "evaluated": [rule...], "batch_size",
        "sample_ids", "tolerance", "wiring", "model", "dtype", "expanded_length", "audio_rows",
        "text": [...], "audio": [...]}`` (the last five when the probe got that far). Model and wiring
        errors are recorded as failures, not raised.
    """
    run = _ProbeRun(model, batch, sample_ids, expect, wiring, tol, device)
    was_training = getattr(model, "training", False)
    with contextlib.suppress(Exception):
        model.eval()
    try:
        info = run.run()
    finally:
        if was_training:
            model.train()
    P = run.P
    info.update(passed=not P.failures, checks=P.checks, failures=P.failures, evaluated=sorted(P.evaluated))
    return info


def probe_indices(samples: list, metas: list[SampleMeta | None], ok: list[bool], n: int) -> list[int]:
    """Indices of the probe batch: the ``n`` shortest clean train samples with target audio (any built
    sample when none is clean), with a multi-segment one in the last slot when ``n >= 3``
    (:func:`probe_pick` of the built samples' facts)."""
    facts = [None if s is None else (m.split, int(s.input_ids.numel()) + int(m.out_T.sum()), int(m.out_T.numel()))
             for s, m in zip(samples, metas)]
    return probe_pick(facts, ok, n)


def probe_pick(facts: list[tuple[str, int, int] | None], ok: list[bool], n: int) -> list[int]:
    """:func:`probe_indices` from per-sample facts alone (the audit keeps these, not the samples).

    Args:
        facts: per sample, ``None`` when it was not built, else ``(split, size, segments)``: size =
            text tokens + audio-out frames, segments = its audio-out segments.
        ok: per sample, it passed the text and audio label rules. n: ``audit.leak_probe_samples``.
    """
    cand = [i for i, f in enumerate(facts) if f is not None and ok[i] and f[2]]
    if not cand:
        cand = [i for i, f in enumerate(facts) if f is not None]
    train = [i for i in cand if facts[i][0] == "train"] or cand

    def size(i: int) -> int:
        return facts[i][1]

    pick = sorted(train, key=size)[: max(n, 1)]
    if n >= 3:
        multi = sorted([i for i in train if facts[i][2] > 1 and i not in pick], key=size)
        if multi and not any(facts[i][2] > 1 for i in pick):
            pick[-1] = multi[0]
    return pick


def packing_probe(model, samples: list, sample_ids: list[str], collator, *, tol: float,
                  device: str | torch.device) -> dict[str, Any]:
    """Packed rows (``train.packing``, :mod:`higgs_tune.packing`) checked on the probe samples.

    The samples go into one packed row and, as the reference, into a padded batch:

    * ``probe_packed_equivalence``: the packed row's target counts equal the padded batch's exactly,
      and its text and per-codebook losses within ``tol`` (relative);
    * ``probe_packed_isolation``: changing every audio code of the first sample with an audio-out
      segment moves its own audio logits and leaves the other samples' within ``tol``.

    Runs whatever ``train.packing`` says (the audit does not read the train section): a failure
    means packed training of this model is broken. Fewer than two samples, a model packing does not
    support (``flash_attention_2``, Whisper features), or no second sample with audio-out columns
    (isolation only) leave the rules unevaluated with a ``note``.

    Returns:
        ``{"checks": [...], "failures": [Failure...], "evaluated": [rule...], "note"?}``. Errors of the
        model are recorded as failures, not raised.
    """
    from .. import packing
    from ..data import sample_length

    P = _Probe()

    def skipped(why: str) -> dict[str, Any]:
        return {"checks": [], "failures": [], "evaluated": [], "note": f"packing not probed: {why}"}

    if len(samples) < 2:
        return skipped("fewer than 2 probe samples")
    try:
        reason = packing.unsupported(model)
        model_config = packing.higgs_model(model).config
        lengths = [sample_length(s, model_config) for s in samples]
    except (TypeError, ValueError) as exc:
        return skipped(str(exc))
    if reason:
        return skipped(reason)
    sid = ",".join(sample_ids)
    # the sample whose codes change: the first in the row with audio-out segments; its audio_logits
    # rows lie between its first segment's start and the next sample's first segment
    packed = packing.packed_collate(samples, lengths, collator)
    row = packed.rows[0]
    n_out = [int((samples[i].input_ids == model_config.audio_out_token_idx).sum()) for i in row]
    k = next((j for j, n in enumerate(n_out) if n), None)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            _, ref = forward_loss(model, collator(samples), device, **UNWEIGHTED)
            with packing.packed_attention(model, packed):
                out_p, got = forward_loss(model, packed.batch, device, **UNWEIGHTED)
            out_q = None
            if k is not None:
                first = samples[row[k]]
                altered = list(samples)
                altered[row[k]] = dataclasses.replace(first, audio_ids_concat=(first.audio_ids_concat + 7) % 1024)
                packed2 = packing.packed_collate(altered, lengths, collator)
                with packing.packed_attention(model, packed2):
                    out_q = model(**batch_to_model_kwargs(packed2.batch, device))
    except Exception as exc:  # noqa: BLE001 - the gate reports, never crashes
        P.record("probe_packed_equivalence", False, sid, f"packed forward raised {type(exc).__name__}: {exc}")
        return {"checks": P.checks, "failures": P.failures, "evaluated": sorted(P.evaluated)}
    finally:
        if was_training:
            model.train()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a.float() - b.float()).abs() / b.float().abs().clamp_min(1e-12)).max())

    counts_equal = (got.n_text_targets == ref.n_text_targets
                    and torch.equal(got.n_codebook_targets.cpu(), ref.n_codebook_targets.cpu()))
    diff = max(rel(got.text_loss, ref.text_loss), rel(got.codebook_losses, ref.codebook_losses))
    P.record("probe_packed_equivalence", counts_equal and diff <= tol, sid,
             f"{len(samples)} samples in one packed row vs a padded batch: targets {got.n_text_targets} text / "
             f"{int(got.n_audio_targets)} audio vs {ref.n_text_targets} / {int(ref.n_audio_targets)}, largest "
             f"relative loss difference {diff:.2e} (tolerance {tol:g})", max_rel_diff=diff,
             padding_efficiency=packed.real_positions / packed.padded_positions)
    out: dict[str, Any] = {}
    starts = [int(x) for x in packed.batch.audio_out_ids_start] + [int(out_p.audio_logits.shape[0])]
    if out_q is not None and sum(n_out) > n_out[k]:
        a = sum(n_out[:k])
        lo, hi = starts[a], starts[a + n_out[k]]
        inside = torch.zeros(out_p.audio_logits.shape[0], dtype=torch.bool)
        inside[lo:hi] = True
        change = (out_q.audio_logits - out_p.audio_logits).abs().flatten(1).amax(1).cpu()
        own, others = float(change[inside].max()), float(change[~inside].max())
        P.record("probe_packed_isolation", others <= tol < own, sid,
                 f"changed every audio code of {sample_ids[row[k]]}: its audio logits moved by up to "
                 f"{own:.2e}, the other packed samples' by up to {others:.2e} (tolerance {tol:g})",
                 own_change=own, others_change=others)
    else:
        out["note"] = "packing isolation not probed: fewer than 2 probe samples have audio-out segments"
    return {**out, "checks": P.checks, "failures": P.failures, "evaluated": sorted(P.evaluated)}
