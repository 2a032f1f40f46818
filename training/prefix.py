"""Trainable prefixes: the paper's reparameterisation P = MLP(P') over a frozen GPT-2 or BART.

Each prefix kind is one HF PEFT `PrefixEncoder` built with `prefix_projection=True`: an embedding
P' `[L, d_model]` followed by Linear(d_model -> k) -> tanh -> Linear(k -> num_layers * 2 * d_model), which
is exactly the paper's MLP. Its output `[L, num_layers * 2 * d_model]` is read in PEFT's layout
(`view(L, 2 * num_layers, H, D).permute(1, 2, 0, 3)`, layer i's key at row 2i, value at 2i + 1) and
returned as our `[num_layers, 2, H, L, D]`.

- `GPT2PrefixTuner` trains through `modeling.gpt2`, the one GPT-2 prefix forward (prefix keys/values
  before the tokens, always visible, positions of real tokens from L), which equals PEFT's
  `PeftModelForCausalLM` forward to float rounding. PEFT supplies only the `PrefixEncoder` module and
  the import/export format; no PEFT model runs here.
- `BartPrefixTuner` trains through `modeling.bart_prefix` (PEFT covers only the decoder
  self-attention of seq2seq models): placement "paper" has encoder, decoder and cross prefixes, each
  from its own embedding + MLP; placement "peft" only the decoder one.

Initialisation (`PrefixConfig.init`), both from the frozen model's keys/values on a real text
(positions 0..L-1) as the MSE target; the fit's relative error is reported:
- "paper" (the paper's code): L is the text's token count, P' keeps its random init and only the MLP
  is fitted, 500 Adam steps at lr 1e-4; the text is also prepended to every source (the CLI does
  that, and records it in the artifact so eval prepends it too).
- "text-fit" (ours, earlier): the text's tokens repeated or cut to L, P' starts as their input
  embeddings, and P' and the MLP are fitted, 300 Adam steps at lr 1e-3 (a much closer fit).
- "random": PEFT's init (embedding N(0, 1), PyTorch's Linear init).

The base model is frozen: every one of its parameters has `requires_grad=False` and it runs in eval
mode (no dropout), so the training loss is a deterministic function of the prefix parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import PrefixTuningConfig, TaskType
from peft.tuners.prefix_tuning import PrefixEncoder
from torch import Tensor, nn

from modeling import bart_prefix, gpt2
from modeling.models import LoadedModel

PLACEMENTS = {"paper": ("encoder", "decoder", "cross"), "peft": ("decoder",)}


INITS = ("random", "text-fit", "paper")
# init -> (fit steps, fit lr, whether P' is fitted too)
INIT_FIT = {"text-fit": (300, 1e-3, True), "paper": (500, 1e-4, False)}


@dataclass(frozen=True)
class PrefixConfig:
    """Shape and initialisation of the trainable prefixes (paper defaults: L=10, k=512).

    `init`: "random", "text-fit" or "paper" (module docstring); a text init needs `init_text`.
    `init_steps` / `init_lr`: None = the init's own (INIT_FIT)."""

    prefix_length: int = 10
    mlp_hidden: int = 512
    init_text: str | None = None
    init_steps: int | None = None
    init_lr: float | None = None
    placement: str = "paper"  # BART only: "paper" (encoder+decoder+cross) or "peft" (decoder)
    init: str = "text-fit"  # used only with init_text

    def fit_settings(self) -> tuple[int, float, bool]:
        """(steps, lr, fit P' too) of the text init."""
        steps, lr, fit_embedding = INIT_FIT[self.init]
        return (
            steps if self.init_steps is None else self.init_steps,
            lr if self.init_lr is None else self.init_lr,
            fit_embedding,
        )


def peft_prefix_config(
    cfg: PrefixConfig, num_layers: int, num_heads: int, hidden: int, task: TaskType
) -> Any:
    """The PEFT config whose `PrefixEncoder` is the paper's embedding + MLP for one prefix kind."""
    return PrefixTuningConfig(
        task_type=task,
        num_virtual_tokens=cfg.prefix_length,
        token_dim=hidden,
        num_layers=num_layers,
        num_attention_heads=num_heads,
        num_transformer_submodules=1,
        prefix_projection=True,
        encoder_hidden_size=cfg.mlp_hidden,
    )


def mlp_output_to_prefix(flat: Tensor, num_layers: int, num_heads: int) -> Tensor:
    """PEFT's `[L, num_layers * 2 * H * D]` -> `[num_layers, 2, H, L, D]` (key = row 2i, value = 2i + 1)."""
    length = flat.shape[0]
    head_dim = flat.shape[1] // (2 * num_layers * num_heads)
    natural = flat.view(length, 2 * num_layers, num_heads, head_dim).permute(
        1, 2, 0, 3
    )  # [2*layers, H, L, D]
    return natural.reshape(num_layers, 2, num_heads, length, head_dim)


def text_token_ids(tokenizer: Any, text: str) -> list[int]:
    """The init text's token ids (its count is L for the paper's init)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"init text {text!r} has no tokens")
    return list(ids)


def init_token_ids(tokenizer: Any, text: str, length: int) -> list[int]:
    """The text's token ids repeated (or cut) to exactly `length` tokens ("text-fit")."""
    ids = text_token_ids(tokenizer, text)
    return [ids[i % len(ids)] for i in range(length)]


def fit_encoder(
    encoder: PrefixEncoder,
    target: Tensor,
    num_layers: int,
    num_heads: int,
    steps: int,
    lr: float,
    fit_embedding: bool = True,
) -> float:
    """Fit one PrefixEncoder's output to `target` `[num_layers, 2, H, L, D]` by MSE (the MLP, and P'
    unless `fit_embedding=False`); returns the relative error ||P - target|| / ||target|| after fitting."""
    length = target.shape[3]
    tokens = torch.arange(length, device=target.device)
    params = [p for n, p in encoder.named_parameters() if fit_embedding or not n.startswith("embedding.")]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        pred = mlp_output_to_prefix(encoder(tokens), num_layers, num_heads)  # [layers, 2, H, L, D]
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = mlp_output_to_prefix(encoder(tokens), num_layers, num_heads)
        return float((pred - target).norm() / target.norm().clamp_min(1e-12))


def init_ids_for(tokenizer: Any, text: str, cfg: PrefixConfig) -> list[int]:
    """The token ids whose keys/values are the init target: the text itself for "paper" (then L must
    be its token count), repeated or cut to L for "text-fit"."""
    if cfg.init == "paper":
        ids = text_token_ids(tokenizer, text)
        if len(ids) != cfg.prefix_length:
            raise ValueError(
                f"the paper's init needs prefix_length = the text's {len(ids)} tokens, got {cfg.prefix_length}"
            )
        return ids
    if cfg.init != "text-fit":
        raise ValueError(f"init must be one of {INITS} with an init text, got {cfg.init!r}")
    return init_token_ids(tokenizer, text, cfg.prefix_length)


class PrefixTuner(nn.Module):
    """What the trainer needs from a trainable prefix over a frozen model (GPT-2 or BART)."""

    kinds: tuple[str, ...]
    init_report: dict[str, float]

    def __init__(self, loaded: LoadedModel, cfg: PrefixConfig) -> None:
        super().__init__()
        self.loaded = loaded
        self.cfg = cfg
        self.init_report = {}

    @property
    def base_model(self) -> nn.Module:
        return self.loaded.model

    def prefixes(self) -> dict[str, Tensor]:
        """The current prefixes (the MLPs' outputs), kind -> `[num_layers, 2, H, L, D]`."""
        raise NotImplementedError

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean cross-entropy over the target tokens of a collated batch (labels != -100)."""
        raise NotImplementedError

    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy generation with the live prefix through the training-time forward (no KV cache)."""
        raise NotImplementedError

    def trainable_state(self) -> dict[str, Tensor]:
        """The trainable parameters by name (what checkpoints hold)."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        params = dict(self.named_parameters())
        missing = {n for n, p in params.items() if p.requires_grad} - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks trainable parameters {sorted(missing)}")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)


class GPT2PrefixTuner(PrefixTuner):
    """A decoder-self-attention prefix for GPT-2, trained through `modeling.gpt2` (the one GPT-2 prefix
    forward, which equals PEFT's `PeftModelForCausalLM` to float rounding: tests/modeling/test_gpt2.py)."""

    kinds = ("decoder",)

    def __init__(self, loaded: LoadedModel, cfg: PrefixConfig) -> None:
        super().__init__(loaded, cfg)
        spec = loaded.spec
        loaded.model.requires_grad_(False)
        loaded.model.eval()  # frozen, no dropout
        peft_cfg = peft_prefix_config(
            cfg, spec.num_layers, spec.num_heads, spec.hidden_size, TaskType.CAUSAL_LM
        )
        self.encoder = PrefixEncoder(peft_cfg).to(device=loaded.device, dtype=torch.float32)
        if cfg.init_text:
            self.init_from_text(cfg.init_text)

    def train(self, mode: bool = True) -> GPT2PrefixTuner:
        super().train(mode)
        self.loaded.model.eval()  # the frozen model never runs dropout
        return self

    def prefixes(self) -> dict[str, Tensor]:
        spec = self.loaded.spec
        tokens = torch.arange(self.cfg.prefix_length, device=self.loaded.device)
        flat = self.encoder(tokens)  # [L, layers * 2 * d_model]
        return {"decoder": mlp_output_to_prefix(flat, spec.num_layers, spec.num_heads)}

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        prefix = self.prefixes()["decoder"]  # [layers, 2, H, L, D] float32; the forward casts it
        logits = gpt2.forward(
            self.loaded.model, batch["input_ids"], batch["attention_mask"], prefix
        )  # [B, S, V]
        # Token t predicts token t + 1 (HF's causal LM loss): mean over the target tokens (labels != -100).
        shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # [B*(S-1), V]
        return torch.nn.functional.cross_entropy(
            shifted, batch["labels"][:, 1:].reshape(-1), ignore_index=-100
        )

    @torch.no_grad()
    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        eos = self.loaded.tokenizer.eos_token_id
        prefix = self.prefixes()["decoder"]  # [layers, 2, H, L, D]
        seq = list(prompt_ids)
        generated: list[int] = []
        for _ in range(max_new_tokens):
            ids = torch.tensor([seq], device=self.loaded.device)  # [1, S]
            logits = gpt2.forward(self.loaded.model, ids, None, prefix)  # [1, S, V]
            next_id = int(logits[0, -1].argmax())
            generated.append(next_id)
            seq.append(next_id)
            if next_id == eos:
                break
        return generated

    @torch.no_grad()
    def _text_keys_values(self, ids: list[int]) -> Tensor:
        """Per-layer keys/values of the frozen model on `ids` (positions 0..L-1): `[layers, 2, H, L, D]`."""
        x = torch.tensor([ids], device=self.loaded.device)  # [1, L]
        _, kv = gpt2.extend(self.loaded.model, x)  # [layers, 2, 1, H, L, D]
        return kv[:, :, 0].float()  # [layers, 2, H, L, D]

    def init_from_text(self, text: str) -> None:
        ids = init_ids_for(self.loaded.tokenizer, text, self.cfg)
        target = self._text_keys_values(ids)  # [layers, 2, H, L, D]
        steps, lr, fit_embedding = self.cfg.fit_settings()
        if fit_embedding:  # "text-fit" starts P' at the tokens' embeddings; "paper" keeps it random
            with torch.no_grad():
                wte = self.loaded.model.get_input_embeddings().weight  # [V, d_model]
                self.encoder.embedding.weight.copy_(wte[torch.tensor(ids, device=wte.device)].float())
        spec = self.loaded.spec
        err = fit_encoder(self.encoder, target, spec.num_layers, spec.num_heads, steps, lr, fit_embedding)
        self.init_report = {"decoder": err}


class BartPrefixTuner(PrefixTuner):
    """BART prefixes trained through `modeling.bart_prefix`: one embedding + MLP per kind."""

    def __init__(self, loaded: LoadedModel, cfg: PrefixConfig) -> None:
        super().__init__(loaded, cfg)
        if cfg.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {sorted(PLACEMENTS)}, got {cfg.placement!r}")
        self.kinds = PLACEMENTS[cfg.placement]
        spec = loaded.spec
        loaded.model.requires_grad_(False)
        loaded.model.eval()
        self.encoders = nn.ModuleDict()
        for kind in self.kinds:
            layers, heads, _ = spec.layout(kind)
            peft_cfg = peft_prefix_config(cfg, layers, heads, spec.hidden_size, TaskType.SEQ_2_SEQ_LM)
            self.encoders[kind] = PrefixEncoder(peft_cfg).to(device=loaded.device, dtype=torch.float32)
        if cfg.init_text:
            self.init_from_text(cfg.init_text)

    def train(self, mode: bool = True) -> BartPrefixTuner:
        super().train(mode)
        self.loaded.model.eval()
        return self

    def prefixes(self) -> dict[str, Tensor]:
        tokens = torch.arange(self.cfg.prefix_length, device=self.loaded.device)
        out = {}
        for kind in self.kinds:
            layers, heads, _ = self.loaded.spec.layout(kind)
            out[kind] = mlp_output_to_prefix(
                self.encoders[kind](tokens), layers, heads
            )  # [layers, 2, H, L, D]
        return out

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        model = self.loaded.model
        prefixes = self.prefixes()
        enc = bart_prefix.encode(model, batch["input_ids"], batch["attention_mask"], prefixes.get("encoder"))
        logits = bart_prefix.decode(
            model,
            batch["decoder_input_ids"],
            enc,
            batch["attention_mask"],
            prefixes.get("decoder"),
            prefixes.get("cross"),
        )  # [B, T, V]
        return torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=-100
        )

    @torch.no_grad()
    def greedy(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        return bart_prefix.greedy_generate(
            self.loaded.model, list(prompt_ids), self.prefixes(), max_new_tokens
        )

    @torch.no_grad()
    def _text_keys_values(self, ids: list[int]) -> dict[str, Tensor]:
        """Keys/values of the frozen model on `ids` for each attention kind, each `[layers, 2, H, L, D]`.

        The text is both the encoder input and the decoder input; cross keys/values are the decoder's
        projections of the encoder outputs. Captured with forward hooks on the k/v projections.
        """
        model = self.loaded.model
        captured: dict[str, list[Tensor]] = {"encoder": [], "decoder": [], "cross": []}
        modules = {
            "encoder": [layer.self_attn for layer in model.get_encoder().layers],
            "decoder": [layer.self_attn for layer in model.get_decoder().layers],
            "cross": [layer.encoder_attn for layer in model.get_decoder().layers],
        }
        hooks = []
        for kind, attns in modules.items():
            for attn in attns:
                for proj in (attn.k_proj, attn.v_proj):
                    hooks.append(
                        proj.register_forward_hook(lambda _m, _i, out, k=kind: captured[k].append(out))
                    )
        try:
            x = torch.tensor([ids], device=self.loaded.device)  # [1, L]
            enc = bart_prefix.encode(model, x)  # [1, L, d]
            bart_prefix.decode(model, x, enc)
        finally:
            for h in hooks:
                h.remove()
        out = {}
        for kind in self.kinds:
            _, heads, head_dim = self.loaded.spec.layout(kind)
            # Hooks fired in layer order, key then value: [2*layers] x [1, L, H*D] -> [layers, 2, H, L, D].
            per = [t[0].view(len(ids), heads, head_dim).transpose(0, 1) for t in captured[kind]]
            out[kind] = torch.stack(per).view(-1, 2, heads, len(ids), head_dim).float()
        return out

    def init_from_text(self, text: str) -> None:
        ids = init_ids_for(self.loaded.tokenizer, text, self.cfg)
        targets = self._text_keys_values(ids)
        emb = self.loaded.model.get_input_embeddings().weight  # [V, d_model]
        steps, lr, fit_embedding = self.cfg.fit_settings()
        for kind in self.kinds:
            layers, heads, _ = self.loaded.spec.layout(kind)
            if fit_embedding:
                with torch.no_grad():
                    self.encoders[kind].embedding.weight.copy_(
                        emb[torch.tensor(ids, device=emb.device)].float()
                    )
            self.init_report[kind] = fit_encoder(
                self.encoders[kind], targets[kind], layers, heads, steps, lr, fit_embedding
            )


def make_tuner(loaded: LoadedModel, cfg: PrefixConfig) -> PrefixTuner:
    """The tuner for the loaded model's architecture."""
    if loaded.spec.is_encoder_decoder:
        return BartPrefixTuner(loaded, cfg)
    return GPT2PrefixTuner(loaded, cfg)
