"""Distillation from a frozen teacher backbone: the losses, the teacher loader, the `Distiller`.

Shared by the distill, prune (recovery fine-tuning) and quant (QAT) stages. Each loss has
its own weight in `DistillLossConfig` (0 = off); any combination runs:

  feature level
    embed     student embedding -> small MLP projector -> the teacher's pooled embedding;
              distance cosine, MSE, or a temperature-softened KL between the softmax of the
              two feature vectors (T^2-scaled as Hinton's KD)
    hint      intermediate maps (FitNets, Romero et al. 2015: student map -> 1x1 conv adapter
              -> MSE to the teacher map; or attention transfer, Zagoruyko & Komodakis 2017)
    relation  SEED (Fang et al., ICLR 2021): similarities of each embedding to a queue of
              teacher embeddings, teacher distribution at t_teacher matched by the student's
              at t_student; label-free
  logit level
    kd        Hinton et al. 2015 on the logits of the teacher's linear-probe head: T^2-scaled
              KL, or the MSE between the two probability vectors
    ce        cross-entropy on labels through the student's own linear head

Every loss is 0 when student and teacher agree (relation: when also t_student == t_teacher).
The teacher stays frozen: eval mode whatever `.train()` is called on the Distiller,
requires_grad False, run under no_grad (bf16 autocast on CUDA).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from core import checkpoint as ckpt
from core.config import choice
from core.errors import UserError
from core.models import feature_dim


@dataclass
class DistillLossConfig:
    """Loss weights (0 = off) and their settings; nested as `loss:` in stage configs."""

    embed: float = 1.0
    embed_distance: str = choice("cosine", "cosine", "mse", "kl")
    embed_temperature: float = 4.0  # "kl": softmax of both feature vectors at T
    hint: float = 0.0
    hint_kind: str = choice("fitnets", "fitnets", "attention")
    hint_layers: List[str] = field(default_factory=lambda: ["layer2", "layer3", "layer4"])
    relation: float = 0.0  # SEED (Fang et al., ICLR 2021)
    relation_queue: int = 4096  # SEED's CIFAR setting (65536 on ImageNet)
    relation_t_student: float = 0.2  # SEED, Sec. 4.1
    relation_t_teacher: float = 0.07
    kd: float = 0.0  # Hinton et al. 2015 on the teacher's probe-head logits
    kd_kind: str = choice("kl", "kl", "mse")
    kd_temperature: float = 4.0
    ce: float = 0.0  # cross-entropy on labels through the student's own linear head


LOSSES = ("embed", "hint", "relation", "kd", "ce")


# ----------------------------------------------------------------------------- losses


def _soft_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def embed_loss(student: Tensor, teacher: Tensor, distance: str, temperature: float = 4.0) -> Tensor:
    """Projected student embedding [B, D] vs the teacher's pooled embedding [B, D].

    cosine: mean of 1 - cos; mse: mean squared error over every element; kl: T^2-scaled KL
    between the softmax of the two feature vectors at temperature T.
    """
    if distance == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=1)).mean()
    if distance == "mse":
        return F.mse_loss(student, teacher)
    if distance == "kl":
        return _soft_kl(student, teacher, temperature)
    raise ValueError(f"unknown embed distance {distance!r}")


def attention_map(x: Tensor) -> Tensor:
    """Zagoruyko & Komodakis 2017: mean over channels of x^2, flattened, L2-normalised."""
    return F.normalize(x.pow(2).mean(1).flatten(1), dim=1)


def hint_loss(student_maps: List[Tensor], teacher_maps: List[Tensor], kind: str) -> Tensor:
    """Mean over layers. fitnets: MSE of the maps (student maps already through the 1x1
    adapters, so channels match); attention: mean squared difference of the attention maps
    (the original code's `(at(x) - at(y)).pow(2).mean()`, without its beta = 1e3 factor,
    which the loss weight takes), parameter-free, so any channel counts work."""
    if len(student_maps) != len(teacher_maps) or not student_maps:
        raise ValueError(f"hint_loss needs as many student maps as teacher maps (>0), got "
                         f"{len(student_maps)} and {len(teacher_maps)}")
    if kind == "fitnets":
        for s, t in zip(student_maps, teacher_maps):
            if s.shape != t.shape:
                raise ValueError(f"fitnets hint: student map {tuple(s.shape)} vs teacher map {tuple(t.shape)}")
        losses = [F.mse_loss(s, t) for s, t in zip(student_maps, teacher_maps)]
    elif kind == "attention":
        losses = [(attention_map(s) - attention_map(t)).pow(2).mean() for s, t in zip(student_maps, teacher_maps)]
    else:
        raise ValueError(f"unknown hint kind {kind!r}")
    return torch.stack(losses).mean()


def relation_loss(student: Tensor, teacher: Tensor, queue: Tensor, t_student: float, t_teacher: float) -> Tensor:
    """SEED (Fang et al. 2021, Eq. 3-4): each sample's similarities to [its teacher embedding,
    the queue of teacher embeddings], softmax at t_teacher (teacher) and t_student (student),
    KL(teacher || student), mean over the batch.

    SEED writes the cross-entropy; the KL differs by the teacher's entropy, a constant for
    the student (same gradients), and is 0 when the two agree. Embeddings are L2-normalised
    here; the queue is expected normalised already [K, D].
    """
    s = F.normalize(student, dim=1)
    t = F.normalize(teacher, dim=1)
    logits_s = torch.cat([(s * t).sum(1, keepdim=True), s @ queue.T], dim=1) / t_student
    logits_t = torch.cat([(t * t).sum(1, keepdim=True), t @ queue.T], dim=1) / t_teacher
    return F.kl_div(F.log_softmax(logits_s, dim=1), F.log_softmax(logits_t, dim=1),
                    reduction="batchmean", log_target=True)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, kind: str, temperature: float = 4.0) -> Tensor:
    """Hinton et al. 2015. kl: T^2 * KL(softmax(t/T) || softmax(s/T)), mean over the batch
    (T^2 keeps gradient magnitudes independent of T); mse: mean squared error between the
    two probability vectors softmax(s/T) and softmax(t/T) (T = 1 for plain probabilities)."""
    if kind == "kl":
        return _soft_kl(student_logits, teacher_logits, temperature)
    if kind == "mse":
        return F.mse_loss(F.softmax(student_logits / temperature, dim=1),
                          F.softmax(teacher_logits / temperature, dim=1))
    raise ValueError(f"unknown kd kind {kind!r}")


# ----------------------------------------------------------------------------- teacher


def load_teacher(teacher_dir: str, head_dir: str = "", need_head: bool = False) -> ckpt.Artifact:
    """The frozen teacher: a backbone artifact (model.pt) plus, optionally, a probe head.

    head_dir: a probe artifact (head.pt) whose head replaces the one in model.pt; "" keeps
    model.pt's head. Every problem is a one-line UserError, raised before any training.
    """
    if not teacher_dir:
        raise UserError("distillation needs teacher=DIR: a backbone artifact such as runs/byol/NAME")
    path = Path(teacher_dir)
    if not path.exists():
        raise UserError(f"teacher {path} does not exist (teacher=...)")
    if path.is_dir() and not (path / "model.pt").is_file():
        why = ("it holds head.pt, so it is a probe artifact: pass it as teacher_head=, and its "
               "backbone as teacher=") if (path / "head.pt").is_file() else "not a finished stage artifact?"
        raise UserError(f"teacher {path} has no model.pt ({why})")
    try:
        art = ckpt.load_model(path, "teacher")
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise UserError(f"teacher {path} is not a backbone artifact (its spec does not rebuild a "
                        f"backbone: {type(e).__name__} {e})") from None
    dim = feature_dim(art.backbone)
    if art.head is not None and art.head.in_features != dim:
        raise UserError(f"teacher {path}: the head in model.pt takes {art.head.in_features}-d "
                        f"features, the backbone gives {dim}-d")
    if head_dir:
        art.head = _load_probe_head(Path(head_dir), path, dim)
    if need_head and art.head is None:
        raise UserError(f"loss.kd > 0 needs the teacher's probe head, and teacher {path} has none in "
                        f"model.pt: pass teacher_head=runs/probe/NAME (from `python -m probe ... "
                        f"artifact={path}`) or set loss.kd=0")
    art.backbone.requires_grad_(False).eval()
    if art.head is not None:
        art.head.requires_grad_(False).eval()
    return art


def _load_probe_head(head_dir: Path, teacher_dir: Path, dim: int) -> nn.Linear:
    path = head_dir / "head.pt" if head_dir.is_dir() else head_dir
    if not path.is_file():
        raise UserError(f"teacher_head {head_dir} has no head.pt (expected the folder a probe of the teacher "
                        f"wrote, runs/probe/NAME; '' uses the head in the teacher's model.pt)")
    blob = ckpt.safe_load(path)
    head_state = blob.get("head") if isinstance(blob, dict) else None
    if not isinstance(head_state, dict) or "weight" not in head_state or "bias" not in head_state:
        raise UserError(f"{path} is not a probe head (expected {{'head': Linear state_dict, ...}})")
    source = blob.get("source")
    if source and Path(source).parts[-2:] != teacher_dir.resolve().parts[-2:]:
        raise UserError(f"teacher_head {head_dir} was trained on {source}, not on teacher {teacher_dir}")
    out_dim, in_dim = head_state["weight"].shape
    if in_dim != dim:
        raise UserError(f"teacher_head {head_dir} takes {in_dim}-d features but teacher "
                        f"{teacher_dir} gives {dim}-d (a head of another backbone?)")
    head = nn.Linear(in_dim, out_dim)
    head.load_state_dict(head_state)
    return head


# ----------------------------------------------------------------------------- distiller


class HintTaps:
    """Where the hint hooks put the maps of the current forward: the hooks reference this small
    object, not the Distiller, so a deep copy of a hooked student copies no teacher."""

    def __init__(self):
        self.capturing = False
        self.maps: Dict[str, Dict[str, Tensor]] = {"student": {}, "teacher": {}}

    def store(self, side: str, layer: str, module, inputs, output) -> None:
        if self.capturing:  # only inside Distiller.forward: kNN and probe passes leave nothing behind
            self.maps[side][layer] = output

    def clear(self) -> None:
        self.maps = {"student": {}, "teacher": {}}


class Distiller(nn.Module):
    """Frozen teacher + trainable adapters (embed projector, hint 1x1 adapters, student CE
    head) + relation queue. `forward(images, labels)` runs teacher and student on the same
    images and returns (weighted total loss, {loss name: detached value}).

    State: `state_dict()` / `load_state_dict()` hold the adapters and the queue only (keys
    projector.*, adapters.*, student_head.*, queue, queue_ptr). The teacher is reloaded from
    its artifact and the student is the caller's to save (it may be pruned or quantised).

    student_dim: the student's pooled feature width; None reads it from its last BatchNorm
    (core.models.feature_dim); pass it for a student without BatchNorm modules (an exported
    graph). Hint layers are found by module name (`student.get_submodule("layer3")`) and
    captured with forward hooks; the adapters' channel counts come from one dry run at
    `image_size` in eval mode (no BatchNorm statistics change). The hooks hold only a `HintTaps`
    (never the Distiller, so a copy of the student does not copy the teacher);
    `remove_hooks()` takes them off.
    """

    _NOT_STATE = ("teacher.", "teacher_head.", "student.")

    def __init__(self, teacher: ckpt.Artifact, student_backbone: nn.Module, cfg: DistillLossConfig,
                 num_classes: int, image_size: int, student_dim: Optional[int] = None):
        super().__init__()
        weights = {name: float(getattr(cfg, name)) for name in LOSSES}
        if any(w < 0 for w in weights.values()):
            raise UserError(f"loss weights must be >= 0, got {weights}")
        if not any(weights.values()):
            raise UserError("every distillation loss weight is 0: set at least one of "
                            "loss.embed, loss.hint, loss.relation, loss.kd, loss.ce")
        if cfg.kd > 0 and teacher.head is None:
            raise UserError("loss.kd > 0 needs the teacher's probe head (teacher_head=runs/probe/NAME)")
        if cfg.kd > 0 and teacher.head.out_features != num_classes:
            raise UserError(f"the teacher's probe head has {teacher.head.out_features} classes, "
                            f"the data has {num_classes}")
        self.cfg = cfg
        self.weights = {name: w for name, w in weights.items() if w > 0}
        self.teacher = teacher.backbone.requires_grad_(False)
        self.teacher_head = teacher.head.requires_grad_(False) if teacher.head is not None else None
        self.student = student_backbone
        dim_s = student_dim or feature_dim(student_backbone)
        dim_t = feature_dim(teacher.backbone)

        # Embedding projector, shared by embed and relation (SEED's student MLP head).
        self.projector = None
        if cfg.embed > 0 or cfg.relation > 0:
            self.projector = nn.Sequential(nn.Linear(dim_s, dim_s), nn.BatchNorm1d(dim_s),
                                           nn.ReLU(inplace=True), nn.Linear(dim_s, dim_t))
        self.student_head = nn.Linear(dim_s, num_classes) if (cfg.kd > 0 or cfg.ce > 0) else None

        self._taps = HintTaps()
        self._hooks: List[torch.utils.hooks.RemovableHandle] = []
        self.adapters = nn.ModuleDict()
        if cfg.hint > 0:
            self._add_hint_taps(cfg.hint_layers, image_size)

        if cfg.relation > 0:
            if cfg.relation_queue < 1:
                raise UserError(f"loss.relation_queue must be >= 1, got {cfg.relation_queue}")
            # SEED initialises the queue with random unit vectors.
            self.register_buffer("queue", F.normalize(torch.randn(cfg.relation_queue, dim_t), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

        self.register_state_dict_post_hook(Distiller._drop_frozen_and_student)
        self.train()

    # ------------------------------------------------------------------ hint taps

    def _add_hint_taps(self, layers: List[str], image_size: int) -> None:
        if not layers:
            raise UserError("loss.hint > 0 needs loss.hint_layers (e.g. [layer2, layer3, layer4])")
        for side, net in (("student", self.student), ("teacher", self.teacher)):
            for layer in layers:
                try:
                    module = net.get_submodule(layer)
                except AttributeError:
                    names = [n for n, _ in net.named_children()]
                    raise UserError(f"loss.hint_layers: the {side} has no module {layer!r} "
                                    f"(top-level modules: {', '.join(names)})") from None
                self._hooks.append(module.register_forward_hook(functools.partial(self._taps.store, side, layer)))
        # One dry run in eval mode (running statistics untouched) gives the channel counts.
        device = next(self.student.parameters()).device
        was_training = self.student.training
        self.student.eval()
        x = torch.zeros(2, 3, image_size, image_size, device=device)
        with torch.no_grad():
            self._taps.capturing = True
            self.teacher.to(device)(x), self.student(x)
            self._taps.capturing = False
        self.student.train(was_training)
        for layer in layers:
            s, t = self._taps.maps["student"][layer], self._taps.maps["teacher"][layer]
            if s.ndim != 4 or t.ndim != 4:
                raise UserError(f"loss.hint_layers: {layer!r} does not give [B, C, H, W] maps")
            if self.cfg.hint_kind == "fitnets":  # attention transfer needs no adapter
                self.adapters[self._key(layer)] = nn.Conv2d(s.shape[1], t.shape[1], kernel_size=1)
        self._taps.clear()

    def remove_hooks(self) -> None:
        """Take the hint taps off the student and the teacher (a student that outlives its
        Distiller, e.g. pruned afterwards, then carries nothing of it)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @staticmethod
    def _key(layer: str) -> str:
        return layer.replace(".", "_")  # ModuleDict keys cannot hold dots

    # ------------------------------------------------------------------ modes and state

    def train(self, mode: bool = True) -> "Distiller":
        """The teacher (and its head) stay in eval mode: a parent's .train() cannot flip them."""
        self.training = mode
        for name, child in self.named_children():
            if name in ("teacher", "teacher_head"):
                child.eval()
            elif name == "student":
                try:
                    child.train(mode)
                except NotImplementedError:
                    pass  # an exported (PT2E) graph: torch.ao's move_exported_model_to_train/eval
            else:
                child.train(mode)
        return self

    @staticmethod
    def _drop_frozen_and_student(module, state_dict, prefix, local_metadata) -> None:
        for key in [k for k in state_dict if k.startswith(tuple(prefix + p for p in Distiller._NOT_STATE))]:
            del state_dict[key]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Strict about the adapters and the queue; the teacher and the student are not state."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith(self._NOT_STATE)]
        unexpected = list(result.unexpected_keys)
        if strict and (missing or unexpected):
            raise RuntimeError(f"Distiller.load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        return result._replace(missing_keys=missing)

    def adapter_parameters(self) -> List[nn.Parameter]:
        """What the optimizer trains besides the student: projector, hint adapters, student head."""
        return [p for n, p in self.named_parameters() if not n.startswith(self._NOT_STATE)]

    # ------------------------------------------------------------------ teacher

    def _teacher_context(self, images: Tensor):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda)

    @torch.no_grad()
    def teacher_logits(self, images: Tensor) -> Tensor:
        """The teacher's class logits (backbone + probe head), no grad, float32."""
        if self.teacher_head is None:
            raise RuntimeError("the teacher has no probe head")
        with self._teacher_context(images):
            return self.teacher_head(self.teacher(images)).float()

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        """FIFO update of the relation queue with the (gathered) teacher embeddings."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [torch.empty_like(keys) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(gathered, keys.contiguous())
            keys = torch.cat(gathered)
        size = self.queue.shape[0]
        keys = keys[-size:]
        index = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)

    # ------------------------------------------------------------------ forward

    def forward(self, images: Tensor, labels: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        cfg = self.cfg
        self._taps.capturing = cfg.hint > 0
        try:
            with torch.no_grad(), self._teacher_context(images):
                t_feat = self.teacher(images)
                t_logits = self.teacher_head(t_feat) if cfg.kd > 0 else None
            s_feat = self.student(images)
        finally:
            self._taps.capturing = False
        t_feat = t_feat.float()
        parts: Dict[str, Tensor] = {}

        if self.projector is not None:
            z = self.projector(s_feat).float()
            if cfg.embed > 0:
                parts["embed"] = embed_loss(z, t_feat, cfg.embed_distance, cfg.embed_temperature)
            if cfg.relation > 0:
                # A copy: the in-place enqueue below must not touch what backward needs.
                parts["relation"] = relation_loss(z, t_feat, self.queue.clone(), cfg.relation_t_student,
                                                  cfg.relation_t_teacher)
                self._enqueue(F.normalize(t_feat, dim=1))

        if cfg.hint > 0:
            s_maps, t_maps = [], []
            for layer in cfg.hint_layers:
                s, t = self._taps.maps["student"][layer], self._taps.maps["teacher"][layer].float()
                if cfg.hint_kind == "fitnets":
                    s = self.adapters[self._key(layer)](s)
                if s.shape[-2:] != t.shape[-2:]:
                    # Same-stem ResNets give equal sizes; a CIFAR-stem student of an ImageNet-stem
                    # teacher (or the reverse) does not: resample the student map to the teacher's.
                    s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
                s_maps.append(s.float())
                t_maps.append(t)
            self._taps.clear()
            parts["hint"] = hint_loss(s_maps, t_maps, cfg.hint_kind)

        if self.student_head is not None:
            logits = self.student_head(s_feat).float()
            if cfg.kd > 0:
                parts["kd"] = kd_loss(logits, t_logits.float(), cfg.kd_kind, cfg.kd_temperature)
            if cfg.ce > 0:
                if labels is None:
                    raise ValueError("loss.ce > 0 needs labels")
                parts["ce"] = F.cross_entropy(logits, labels)

        total = sum(self.weights[name] * value for name, value in parts.items())
        return total, {name: value.detach() for name, value in parts.items()}
