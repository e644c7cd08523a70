"""Greedy decoding that gives the same bits whatever else is decoded with it: the one engine behind training's
golden probes, `infer`, `serve` and `merge`'s check.

Why the answers do not depend on the load:
- every decoding step runs SLOTS rows (idle slots padded), so each matrix product has the same shape whether one
  request is decoding or SLOTS are: a BLAS picks its kernel (and so its rounding) by shape, and a row of a product
  does not depend on the values in the other rows;
- a product with few outputs (at most NARROW: a LoRA layer's down-projection x A^T, r outputs, or a narrow
  projection) is a multiply and a sum over the input features, not a BLAS product: at a few rows and few outputs
  MKL splits the sum between threads (measured on the AMD EPYC: 12-32 outputs at 8 rows, 20-32 at 16, with 2 or
  4 threads), so its bits would follow the thread count; ATen's sum adds each output's terms in one fixed order on
  one thread, whatever the thread count and the number of rows;
- the wider products go to oneDNN with each weight packed once into its own layout (MKL repacks the weight on every
  call, which at a few rows costs more than the product); measured on the AMD EPYC, oneDNN's fp32 products of the
  model's shapes gave the same bits at 1, 2 and 4 threads at every row count from 1 to 69 and at 100-700, and a
  row's bits did not depend on the other rows' values. Under the `portable` profile, whose promise across CPU
  vendors rests on MKL's COMPATIBLE path, and off x86-64 (not measured), MKL does them;
- a request's prompt is run alone (prefill): its shapes depend on that request only;
- attention is per request: its query against its own key/value cache, so no other request's data (nor its length,
  nor padding) enters its arithmetic;
- rotary tables are computed in fixed chunks of positions, so a position's angle never depends on the total length.

Rows that no request needs carry guesses (prompt lookup, as transformers' `prompt_lookup_num_tokens`): the tokens
that followed the latest earlier occurrence of a request's last few tokens, each at the next position of that
request. A guess's row is computed exactly as the row of the step that would decode that position (the same
product rows, its query against its own cache up to that position), so where the guess equals the token the
previous row chose, that row's logits are the ones the next step would have produced, and the next token is
taken from them: several tokens in one step, the same bits and tokens as one token a step. A wrong guess costs
nothing but its row, which was idle; its cache entries lie past the request's length and are overwritten.

The model forward is written out over the Hugging Face modules of the model (embedding, norms, projections, MLP,
output head), called as they are, except the linear layers (`linear`): a PEFT LoRA layer is its base layer plus
lora_B(x A^T) * scaling, as PEFT computes it, with narrow products summed as above; a merged model holds the merged
weights. The output head runs on the last position only. Families: llama, mistral, qwen2, gpt2, gpt_neox.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from reprolora.core import pins
from reprolora.core.errors import ReproloraError
from reprolora.data.dataset import Messages, prompt_ids

SLOTS = 8  # rows of every decoding step: every product of a step has this many rows, whatever the load
NARROW = 64  # products with at most this many outputs are summed by ATen (module docstring)
SUM_ROWS = 64  # rows per multiply-and-sum: bounds its [rows, outputs, in] temporary
BLOCK = 64  # positions per key/value cache block: caches grow by whole blocks, never copied per token
ROTARY_CHUNK = 64  # positions per rotary table chunk
LOOKUP_NGRAM = 3  # a guess follows the latest earlier match of a request's last 3, else 2, else 1 tokens


@dataclass(frozen=True)
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, the stop token excluded
    text: str
    finish_reason: str  # "stop" (end-of-sequence token or stop string) or "length"
    logits_sha256: str  # sha256 of the float32 logits of every decoding step, in order


def stop_token_ids(tokenizer: Any, model: Any) -> set[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return ids


@dataclass
class Sequence:
    """One request being decoded: its ids, its key/value cache and what it has produced so far."""

    prompt_ids: list[int]
    max_new_tokens: int
    stop: list[str]
    on_token: Callable[[list[int]], None] | None
    generated: list[int] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256)
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer [kv_heads, capacity, head_dim]
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0  # positions in the cache
    finish: str | None = None  # set once decoding has ended
    text: str = ""

    @property
    def done(self) -> bool:
        return self.finish is not None

    def completion(self) -> Completion:
        return Completion(
            self.prompt_ids, list(self.generated), self.text, self.finish or "length", self.digest.hexdigest()
        )


class Engine:
    """The batch-invariant decoder over one causal LM (a PeftModel's model, or a plain or merged one)."""

    def __init__(self, model: Any, tokenizer: Any, guess: bool = True) -> None:
        if hasattr(model, "get_base_model"):  # a PeftModel: decode with the model inside, as training does
            model = model.get_base_model()
        self.model, self.tokenizer = model, tokenizer
        self.eos = stop_token_ids(tokenizer, model)
        config = model.config
        self.family = config.model_type
        heads = config.num_attention_heads
        self.heads = heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.windows: list[int | None]
        if self.family in ("llama", "mistral", "qwen2"):
            inner = model.model
            self.embed, self.layers, self.final_norm, self.rotary = (
                inner.embed_tokens,
                list(inner.layers),
                inner.norm,
                inner.rotary_emb,
            )
            self.head = model.lm_head
            window = getattr(config, "sliding_window", None)
            if self.family == "mistral":
                self.windows = [window] * len(self.layers)
            elif self.family == "qwen2":
                types = getattr(config, "layer_types", None) or ["full_attention"] * len(self.layers)
                self.windows = [window if kind == "sliding_attention" else None for kind in types]
            else:
                self.windows = [None] * len(self.layers)
            self.scalings = [self.head_dim**-0.5] * len(self.layers)
        elif self.family == "gpt2":
            inner = model.transformer
            self.embed, self.positions, self.layers, self.final_norm = inner.wte, inner.wpe, list(inner.h), inner.ln_f
            self.head, self.rotary = model.lm_head, None
            self.windows = [None] * len(self.layers)
            if getattr(config, "reorder_and_upcast_attn", False):
                raise ReproloraError("gpt2 models with reorder_and_upcast_attn are not supported by the decoder")
            scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
            self.scalings = [
                scale / (i + 1) if config.scale_attn_by_inverse_layer_idx else scale for i in range(len(self.layers))
            ]
        elif self.family == "gpt_neox":
            inner = model.gpt_neox
            self.embed, self.layers, self.final_norm, self.rotary = (
                inner.embed_in,
                list(inner.layers),
                inner.final_layer_norm,
                inner.rotary_emb,
            )
            self.head = model.get_output_embeddings()
            self.windows = [None] * len(self.layers)
            self.scalings = [self.head_dim**-0.5] * len(self.layers)
        else:
            raise ReproloraError(
                f"the decoder knows model types llama, mistral, qwen2, gpt2, gpt_neox, not {self.family!r}"
            )
        self.cos: torch.Tensor | None = None  # rotary table, [positions, rotary dims]
        self.sin: torch.Tensor | None = None
        self.guess = guess  # idle rows carry guessed tokens (module docstring); False: one token a step
        self.steps = 0  # decoding steps run (each SLOTS rows)
        self.rows = 0  # requests decoded over those steps
        self.guessed = 0  # rows that carried a guess
        self.accepted = 0  # guesses that were right: tokens decoded beyond one per request and step

    # ----------------------------------------------------------------------------------------- the public API

    def start(
        self,
        ids: list[int],
        max_new_tokens: int,
        stop: list[str] | None = None,
        on_token: Callable[[list[int]], None] | None = None,
    ) -> Sequence:
        """A new sequence with its prompt run (alone) and its first token chosen; it may be done already."""
        sequence = Sequence(list(ids), max_new_tokens, list(stop or []), on_token)
        if max_new_tokens < 1:
            sequence.finish = "length"
            return sequence
        with torch.inference_mode():
            logits = self._prefill(sequence)
        self._take(sequence, logits[0])
        return sequence

    def step(self, sequences: list[Sequence]) -> None:
        """At least one token more for each sequence (at most SLOTS, none done), computed in one fixed-shape step;
        more where the guesses in the idle rows were right."""
        if not 0 < len(sequences) <= SLOTS or any(s.done for s in sequences):
            raise ValueError(f"step takes 1 to {SLOTS} sequences that are not done")
        guessing = self.guess and len(sequences) < SLOTS  # no lookups where no row is idle (a full batch)
        found = [
            lookup(s.prompt_ids + s.generated, min(SLOTS - 1, s.max_new_tokens - len(s.generated) - 1))
            if guessing
            else []
            for s in sequences
        ]
        guesses = share_idle_rows(found)
        rows = [
            (sequence, token, sequence.length + offset)
            for sequence, guessed in zip(sequences, guesses, strict=True)
            for offset, token in enumerate([sequence.generated[-1], *guessed])
        ]
        with torch.inference_mode():
            logits = self._decode(rows)
        self.steps += 1
        self.rows += len(sequences)
        self.guessed += len(rows) - len(sequences)
        row = 0
        for sequence, guessed in zip(sequences, guesses, strict=True):
            for offset in range(len(guessed) + 1):  # row offset's input token is now known right: it stays cached
                self._take(sequence, logits[row + offset])
                sequence.length += 1
                if sequence.done or offset == len(guessed) or sequence.generated[-1] != guessed[offset]:
                    break
                self.accepted += 1
            row += len(guessed) + 1

    # ----------------------------------------------------------------------------------------- choosing tokens

    def _take(self, sequence: Sequence, logits: torch.Tensor) -> None:
        logits = logits.float()
        sequence.digest.update(logits.numpy().tobytes())
        token = int(torch.argmax(logits))
        if token in self.eos:
            self._finish(sequence, "stop")
            return
        sequence.generated.append(token)
        if sequence.on_token is not None:
            sequence.on_token(sequence.generated)
        if sequence.stop and any(
            s in self.tokenizer.decode(sequence.generated, skip_special_tokens=True) for s in sequence.stop
        ):
            self._finish(sequence, "stop")
        elif len(sequence.generated) >= sequence.max_new_tokens:
            self._finish(sequence, "length")

    def _finish(self, sequence: Sequence, reason: str) -> None:
        text = self.tokenizer.decode(sequence.generated, skip_special_tokens=True)
        if sequence.stop:
            cut = min((text.find(s) for s in sequence.stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
        sequence.finish, sequence.text = reason, text
        sequence.keys, sequence.values = [], []  # free the cache

    # ----------------------------------------------------------------------------------------- the forward

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin rows for `positions`, from a table grown chunk by chunk by the model's own rotary module."""
        needed = int(positions.max()) + 1
        if self.cos is None or self.cos.shape[0] < needed:
            chunks = -(-needed // ROTARY_CHUNK)
            positions_table = torch.arange(chunks * ROTARY_CHUNK).reshape(chunks, ROTARY_CHUNK)
            pairs = [self.rotary(torch.zeros(1, dtype=torch.float32), row.unsqueeze(0)) for row in positions_table]
            self.cos = torch.cat([cos[0] for cos, _ in pairs])
            self.sin = torch.cat([sin[0] for _, sin in pairs])
        return self.cos[positions], self.sin[positions]

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.family == "gpt2":
            x = x + self.positions(positions)
        return x

    def _qkv(self, layer: Any, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """q [n, heads, d], k and v [n, kv_heads, d] of the normed input `h` [n, hidden], and the attention module."""
        n, d = h.shape[0], self.head_dim
        if self.family == "gpt2":
            attn = layer.attn
            q, k, v = linear(attn.c_attn, h).split(self.heads * d, dim=-1)
        elif self.family == "gpt_neox":
            attn = layer.attention
            q, k, v = linear(attn.query_key_value, h).view(n, self.heads, 3 * d).chunk(3, dim=-1)
        else:
            attn = layer.self_attn
            q, k, v = linear(attn.q_proj, h), linear(attn.k_proj, h), linear(attn.v_proj, h)
        return q.reshape(n, self.heads, d), k.reshape(n, self.kv_heads, d), v.reshape(n, self.kv_heads, d), attn

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """HF's rotary embedding on [n, heads, d] (GPT-NeoX: on the first rotary dims only)."""
        dims = cos.shape[-1]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        rot, rest = x[..., :dims], x[..., dims:]
        half = dims // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos + rotated * sin
        return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out

    def _layer(
        self,
        index: int,
        x: torch.Tensor,
        attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
    ) -> torch.Tensor:
        layer = self.layers[index]
        norm1 = layer.ln_1 if self.family == "gpt2" else layer.input_layernorm
        q, k, v, attn = self._qkv(layer, norm1(x))
        if cos is not None:
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        out = attend(index, q, k, v).reshape(x.shape[0], self.heads * self.head_dim)
        if self.family == "gpt2":
            x = x + linear(attn.c_proj, out)
            return x + self._mlp(layer.mlp, layer.ln_2(x))
        if self.family == "gpt_neox":
            attn_out = linear(attn.dense, out)
            if layer.use_parallel_residual:
                return self._mlp(layer.mlp, layer.post_attention_layernorm(x)) + attn_out + x
            x = attn_out + x
            return self._mlp(layer.mlp, layer.post_attention_layernorm(x)) + x
        x = x + linear(attn.o_proj, out)
        return x + self._mlp(layer.mlp, layer.post_attention_layernorm(x))

    def _mlp(self, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        """The family's MLP, as transformers writes it (GPT-2's dropout: none at inference), its layers via linear."""
        if self.family == "gpt2":
            return linear(mlp.c_proj, mlp.act(linear(mlp.c_fc, x)))
        if self.family == "gpt_neox":
            return linear(mlp.dense_4h_to_h, mlp.act(linear(mlp.dense_h_to_4h, x)))
        return linear(mlp.down_proj, mlp.act_fn(linear(mlp.gate_proj, x)) * linear(mlp.up_proj, x))

    def _attention(
        self,
        index: int,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        allowed: torch.Tensor | None,
        causal: bool = False,
    ) -> torch.Tensor:
        """softmax(q k^T * scale) v for one request: q [n, heads, d], keys/values [kv_heads, L, d] -> [n, heads, d].

        torch's scaled_dot_product_attention on a batch of one, as training runs it: 4-D inputs take its fused CPU
        (flash) kernel, which gives the same bits at any thread count, where a matmul + softmax written out here did
        not (1 against 2 threads, default model, native pins); 3-D inputs would take its slower math path.
        `allowed` [n, L] marks the keys each query may see; `causal` says the usual causal mask instead.
        """
        # enable_gqa: each key/value head serves consecutive query heads, as transformers' repeat_kv
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            keys[None],
            values[None],
            attn_mask=allowed,
            is_causal=causal,
            scale=self.scalings[index],
            enable_gqa=self.heads != self.kv_heads,
        )
        return out[0].transpose(0, 1)

    def _store(self, sequence: Sequence, index: int, k: torch.Tensor, v: torch.Tensor, at: int) -> None:
        """Write k, v [n, kv_heads, d] at positions at.. of the sequence's cache, growing it by whole blocks."""
        end = at + k.shape[0]
        if index == len(sequence.keys):
            capacity = -(-end // BLOCK) * BLOCK
            sequence.keys.append(torch.empty(self.kv_heads, capacity, self.head_dim))
            sequence.values.append(torch.empty(self.kv_heads, capacity, self.head_dim))
        elif end > sequence.keys[index].shape[1]:
            for cache in (sequence.keys, sequence.values):
                grown = torch.empty(self.kv_heads, -(-end // BLOCK) * BLOCK, self.head_dim)
                grown[:, :at] = cache[index][:, :at]
                cache[index] = grown
        sequence.keys[index][:, at:end] = k.transpose(0, 1)
        sequence.values[index][:, at:end] = v.transpose(0, 1)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.head, self.final_norm(x)).float()

    def _prefill(self, sequence: Sequence) -> torch.Tensor:
        """The prompt alone through the model; its caches filled; the last position's logits [1, vocab]."""
        n = len(sequence.prompt_ids)
        positions = torch.arange(n)
        x = self._embed(torch.tensor(sequence.prompt_ids, dtype=torch.long), positions)
        cos, sin = self._rotary(positions) if self.rotary is not None else (None, None)
        # [query, key]: a key at or before its query, and within the window; one mask per window size
        allowed = {
            window: (positions.unsqueeze(0) <= positions.unsqueeze(1))
            & (positions.unsqueeze(0) > positions.unsqueeze(1) - window)
            for window in set(self.windows)
            if window is not None
        }

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            self._store(sequence, index, k, v, 0)
            window = self.windows[index]
            if window is None:
                return self._attention(index, q, k.transpose(0, 1), v.transpose(0, 1), None, causal=True)
            return self._attention(index, q, k.transpose(0, 1), v.transpose(0, 1), allowed[window])

        for index in range(len(self.layers)):
            x = self._layer(index, x, attend, cos, sin)
        sequence.length = n
        return self._logits(x[-1:])

    def _decode(self, rows: list[tuple[Sequence, int, int]]) -> torch.Tensor:
        """Logits [SLOTS, vocab] of `rows` (sequence, input token, its position), in SLOTS rows (the rest padding).
        A sequence's rows are at consecutive positions from its length on, in order: each row's key and value are
        cached before the next row's query reads them."""
        padding = SLOTS - len(rows)  # whatever the load: the products' shapes, and so their bits, never change
        tokens = [token for _, token, _ in rows] + [0] * padding
        positions = torch.tensor([at for _, _, at in rows] + [0] * padding)
        x = self._embed(torch.tensor(tokens, dtype=torch.long), positions)
        cos, sin = self._rotary(positions) if self.rotary is not None else (None, None)
        starts = [row for row in range(len(rows)) if row == 0 or rows[row][0] is not rows[row - 1][0]]
        spans = list(zip(starts, starts[1:] + [len(rows)], strict=True))  # each sequence's rows

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            for start, end in spans:  # a sequence's rows into its cache at once: a row reads none past its own
                self._store(rows[start][0], index, k[start:end], v[start:end], rows[start][2])
            window = self.windows[index]
            outs = []
            for row, (sequence, _, at) in enumerate(rows):
                first = max(0, at + 1 - window) if window is not None else 0
                outs.append(
                    self._attention(
                        index,
                        q[row : row + 1],
                        sequence.keys[index][:, first : at + 1],
                        sequence.values[index][:, first : at + 1],
                        None,
                    )
                )
            outs.append(torch.zeros_like(q[len(rows) :]))  # padding rows attend to nothing
            return torch.cat(outs)

        for index in range(len(self.layers)):
            x = self._layer(index, x, attend, cos, sin)
        return self._logits(x)


def lookup(tokens: list[int], limit: int) -> list[int]:
    """`limit` tokens that followed the latest earlier occurrence of the last LOOKUP_NGRAM (else fewer) tokens; where
    they run into the end, the copy goes on over itself, as a repeating pattern would (a loop of one token: that token).
    """
    for n in range(min(LOOKUP_NGRAM, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        for end in range(len(tokens) - 2, n - 2, -1):  # where an earlier match would end, latest first
            if tokens[end] == suffix[-1] and tokens[end - n + 1 : end + 1] == suffix:
                guesses: list[int] = []
                for at in range(end + 1, end + 1 + limit):
                    guesses.append(tokens[at] if at < len(tokens) else guesses[at - len(tokens)])
                return guesses
    return []


def share_idle_rows(found: list[list[int]]) -> list[list[int]]:
    """The guesses each of len(found) sequences gets from `found`, its lookups, in the SLOTS - len(found) idle rows:
    shared out in turn, every sequence's first guess before any second one."""
    guesses: list[list[int]] = [[] for _ in found]
    idle = SLOTS - len(found)
    for turn in range(SLOTS - 1):
        for candidates, guessed in zip(found, guesses, strict=True):
            if idle and turn < len(candidates):
                guessed.append(candidates[turn])
                idle -= 1
    return guesses


@functools.cache
def packs_weights() -> bool:
    """Whether the decoder multiplies by oneDNN with packed weights (module docstring): on x86-64, not under
    `portable`. A process without pins (a test's) counts as `native`."""
    profile = pins.applied()["profile"] if pins.is_applied() else "native"
    return platform.machine() == "x86_64" and torch.backends.mkldnn.is_available() and profile != "portable"


def packed_product(module: Any, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x W^T + bias by oneDNN, W packed once per module and again only when the module's weight changes."""
    cached = module.__dict__.get("_reprolora_packed")
    if cached is None or cached[0] is not module.weight or cached[1] != module.weight._version:
        cached = (
            module.weight,
            module.weight._version,
            torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None),
        )
        module.__dict__["_reprolora_packed"] = cached
    return torch.ops.mkldnn._linear_pointwise(x, cached[2], module.bias, "none", [], "")


def summed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T for a narrow W [out, in] as a multiply and an ATen sum over the input features, SUM_ROWS rows at a time:
    each output's terms are added in one order on one thread, whatever the thread count and the number of rows."""
    return torch.cat([(rows.unsqueeze(1) * weight).sum(-1) for rows in x.split(SUM_ROWS)])


def linear(module: Any, x: torch.Tensor) -> torch.Tensor:
    """module(x) for a linear layer (nn.Linear, GPT-2's Conv1D, or a PEFT LoRA layer over one), with every product
    of at most NARROW outputs (a LoRA down-projection x A^T among them) computed by `summed`, not by the BLAS, and the
    wider ones by `packed_product` where `packs_weights()`."""
    lora_A = getattr(module, "lora_A", None)
    if lora_A is not None:
        result = linear(module.base_layer, x)  # a merged layer's base holds the merged weights
        if module.disable_adapters or module.merged:
            return result
        for name in module.active_adapters:
            if name not in lora_A:
                continue
            if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False):
                raise ReproloraError(f"the decoder runs plain LoRA layers, not DoRA or other variants ({name!r})")
            x_in = module.lora_dropout[name](x.to(lora_A[name].weight.dtype))
            result = result + linear(module.lora_B[name], linear(lora_A[name], x_in)) * module.scaling[name]
        return result
    if isinstance(module, torch.nn.Linear):
        weight = module.weight
    elif type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight [in, out]
        weight = module.weight.t()
    else:
        return module(x)
    if weight.shape[0] > NARROW:
        if weight.dtype == torch.float32 and packs_weights():
            return packed_product(module, weight, x)
        return module(x)
    out = summed(x, weight)
    return out if module.bias is None else out + module.bias


def request_ids(tokenizer: Any, prompt: str | Messages) -> list[int]:
    """The token ids decoding starts from: `prompt` as one user message, or a conversation, rendered."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return prompt_ids(tokenizer, messages)


def engine_for(model: Any, tokenizer: Any) -> Engine:
    """The model's engine, made once and kept on the model (its rotary table grows as positions are needed): under
    profile `reference`, the reference decoder's (reprolora.decoding.reference)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    engine = inner.__dict__.get("_reprolora_engine")
    if engine is None or engine.tokenizer is not tokenizer:
        if pins.is_applied() and pins.applied()["profile"] == "reference":
            from reprolora.decoding.reference import ReferenceEngine

            engine = ReferenceEngine(inner, tokenizer)
        else:
            engine = Engine(inner, tokenizer)
        inner.__dict__["_reprolora_engine"] = engine
    return engine


def greedy(
    model: Any,
    tokenizer: Any,
    prompt: str | Messages,
    max_new_tokens: int,
    stop: list[str] | None = None,
    on_token: Callable[[list[int]], None] | None = None,
) -> Completion:
    """Greedy decoding of `prompt` (one user message, or a conversation), alone: the same bits as when it is
    decoded among others (Engine).

    `on_token` sees the generated ids after each new token (streaming); it does not change what is decoded.
    """
    engine = engine_for(model, tokenizer)
    sequence = engine.start(request_ids(tokenizer, prompt), max_new_tokens, stop, on_token)
    while not sequence.done:
        engine.step([sequence])
    return sequence.completion()
