"""The two ways `sorsa eval` runs a model: transformers (a checkpoint, or a decomposed DIR through its
SORSA layers) and llama.cpp (a GGUF file). Both offer the same three calls to every benchmark:
load(), nll(ds, indices) (teacher-forced NLL of data.Dataset examples, the trainer's loss) and
generate(prompts, ...) (greedy, or sampled with a seed), so a benchmark never knows which it has.
"""

from __future__ import annotations

import itertools
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from sorsa_tools.data import IGNORE, Dataset
from sorsa_tools.errors import InputError, MissingDependencyError, ModelKindError
from sorsa_tools.evaluate.models import ACCEPTED, ModelSpec
from sorsa_tools.train import head_cross_entropy, label_positions

LOSS_CHUNK = 512  # response tokens per LM-head piece in the NLL: 0.5 GiB of logits at a 262k vocabulary
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Sampling:
    """Sampled decoding (pass@k with k > 1): temperature and top-p, and a seed that each generate
    call advances, so a run with the same seed, batch size and model gives the same samples."""

    temperature: float
    top_p: float = 0.95
    seed: int = 0
    _calls: itertools.count = field(default_factory=itertools.count, repr=False)

    def next_seed(self) -> int:
        return self.seed * 1_000_003 + next(self._calls)

    def hf_options(self) -> dict:
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}

    def llama_options(self) -> dict:
        return {"top_k": 0, "top_p": self.top_p, "temp": self.temperature}


def open_backend(spec: ModelSpec, device: str, dtype: str):
    """The backend that runs MODEL: llama.cpp for a GGUF file, transformers for the rest."""
    return GGUFBackend(spec, device) if spec.kind == "gguf" else HFBackend(spec, device, dtype)


def per_example_nll(model, batch: dict[str, torch.Tensor], chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """(rows, 2): the summed next-token cross-entropy of each row's label tokens, and their count.

    The same computation as train.loss_sum (decoder, then the LM head and softcapping only at
    positions that carry loss, float32 cross-entropy), kept per row instead of summed over the batch.
    """
    h, t, sel = label_positions(model, batch)
    rows = torch.arange(sel.shape[0], device=sel.device)[:, None].expand_as(sel)[sel]
    ce = torch.empty(t.numel(), dtype=torch.float32, device=h.device)
    for i in range(0, t.numel(), chunk):
        ce[i : i + chunk] = head_cross_entropy(model, h[i : i + chunk], t[i : i + chunk], reduction="none")
    out = torch.zeros(sel.shape[0], 2, dtype=torch.float64, device=h.device)
    out[:, 0].index_add_(0, rows, ce.double())
    out[:, 1] = sel.sum(1).double()
    return out.cpu()


class _StopOnText:
    """A per-sequence stopping criterion: True for rows whose new text holds a stop string."""

    def __init__(self, tok, start: int, stops: tuple[str, ...], window: int = 24):
        self.tok, self.start, self.stops, self.window = tok, start, stops, window
        self.stopped_at: dict[int, int] = {}  # row -> new tokens when its stop string appeared

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        tail = input_ids[:, max(self.start, input_ids.shape[1] - self.window) :]
        texts = self.tok.batch_decode(tail, skip_special_tokens=True)
        hits = [any(s in t for s in self.stops) for t in texts]
        for r, hit in enumerate(hits):  # the row's length, whatever padding follows it
            if hit:
                self.stopped_at.setdefault(r, input_ids.shape[1] - self.start)
        return torch.tensor(hits, device=input_ids.device)


def _cut(text: str, stops: tuple[str, ...]) -> str:
    """text up to its first stop string."""
    at = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    return text[:at]


class HFBackend:
    """A transformers model: a checkpoint, or a decomposed DIR with SORSA layers."""

    batched = True

    def __init__(self, spec: ModelSpec, device: str, dtype: str):
        from transformers import AutoTokenizer

        self.device = torch.device(device)
        if dtype != "auto" and dtype not in DTYPES:
            raise InputError(f"--dtype must be auto or one of {', '.join(DTYPES)}, not {dtype!r}")
        self.dtype = (
            DTYPES[dtype]
            if dtype != "auto"
            else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(spec.path)
        except (OSError, ValueError) as e:
            raise InputError(
                f"{spec.path} has no usable tokenizer ({str(e).splitlines()[0]}); copy the base model's "
                "tokenizer files there"
            ) from None
        self.spec = spec
        self.model = None

    def load(self) -> None:
        if self.model is None:
            from transformers import AutoModelForCausalLM

            try:
                if self.spec.kind == "hf":
                    model = AutoModelForCausalLM.from_pretrained(self.spec.path, dtype=self.dtype)
                else:
                    from sorsa_tools.model import load_sorsa_model

                    model, _, _ = load_sorsa_model(
                        self.spec.path, self.spec.adapter, device="cpu", dtype=self.dtype
                    )
            except (OSError, ValueError, KeyError) as e:
                raise ModelKindError(
                    f"transformers cannot load {self.spec.path} as a causal LM ({str(e).splitlines()[0]}); "
                    f"pass {ACCEPTED}"
                ) from None
            self.model = model.to(self.device).eval()
            gc = self.model.generation_config
            eos = gc.eos_token_id if gc is not None else None
            eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
            if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
                eos.append(self.tokenizer.eos_token_id)
            self.eos = eos
            self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0]

    def _autocast(self):
        """bf16 autocast on CUDA, as in training (float32 SORSA factors on a bf16 residual); off
        when float32 was asked for."""
        on = self.device.type == "cuda" and self.dtype != torch.float32
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on)

    def nll(self, ds: Dataset, indices: list[int]) -> list[tuple[float, int]]:
        batch = {k: v.to(self.device) for k, v in ds.collate([[i] for i in indices]).items()}
        with torch.inference_mode(), self._autocast():
            out = per_example_nll(self.model, batch)
        return [(float(s), int(n)) for s, n in out.tolist()]

    def generate(
        self,
        prompts: list[str],
        add_special: bool,
        max_new_tokens: int,
        stops: tuple[str, ...],
        sampling: Sampling | None = None,
    ) -> list[tuple[str, int]]:
        """Greedy (sampling None) or sampled completions of left-padded prompts: (text, tokens)."""
        from transformers import GenerationConfig, StoppingCriteriaList

        tok = self.tokenizer
        if tok.pad_token_id is None:  # padding needs one; masked out, so any token does
            tok.pad_token = tok.convert_ids_to_tokens(self.pad)
        side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = tok(prompts, add_special_tokens=add_special, padding=True, return_tensors="pt")
        finally:
            tok.padding_side = side
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        cfg = GenerationConfig(
            max_new_tokens=max_new_tokens,
            num_beams=1,
            **(sampling.hf_options() if sampling else {"do_sample": False}),
            use_cache=True,
            eos_token_id=self.eos,
            pad_token_id=self.pad,
        )
        stop = StoppingCriteriaList([_StopOnText(tok, ids.shape[1], stops)]) if stops else None
        if sampling is not None:
            torch.manual_seed(sampling.next_seed())
        with torch.inference_mode(), self._autocast():
            gen = self.model.generate(
                input_ids=ids, attention_mask=mask, generation_config=cfg, stopping_criteria=stop
            )
        results = []
        for r, row in enumerate(gen[:, ids.shape[1] :].tolist()):
            n = next((k + 1 for k, t in enumerate(row) if t in self.eos), None)
            at = stop[0].stopped_at.get(r) if stop else None
            if at is not None and (n is None or at < n):  # a stop string came first (pad may be EOS)
                n = at
            if n is None:  # stopped by max_new_tokens
                n = len(row)
                while n and row[n - 1] == self.pad:
                    n -= 1
            text = tok.decode(row[:n], skip_special_tokens=True)
            results.append((_cut(text, stops), n))
        return results

    def close(self) -> None:
        self.model = None


class _LlamaTokenizer:
    """The GGUF's own tokenizer behind the interface data.Dataset uses (texts -> input_ids)."""

    chat_template = None

    def __init__(self, llm):
        self.llm = llm
        self.eos_token_id = llm.token_eos()
        self.pad_token_id = None

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:
        return {
            "input_ids": [
                self.llm.tokenize(t.encode("utf-8"), add_bos=add_special_tokens, special=False) for t in texts
            ]
        }


@contextmanager
def _quiet_fd2():
    """llama.cpp prints load-time warnings (SWA cache, context sizes) straight to file descriptor 2,
    past Python and past verbose=False; the CLI keeps stderr for its progress and one-line errors."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class GGUFBackend:
    """A GGUF file through llama-cpp-python: one sequence at a time (its high-level API has no
    batched generation), logits of every position only for the NLL (logits_all costs memory)."""

    batched = False

    def __init__(self, spec: ModelSpec, device: str):
        try:
            import llama_cpp
        except ImportError:
            raise MissingDependencyError(
                "evaluating a GGUF file needs llama-cpp-python, which is not installed; "
                "pip install llama-cpp-python, or evaluate the HF checkpoint instead (sorsa merge --to hf)"
            ) from None
        self._llama = llama_cpp
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        if device.startswith("cuda") and not gpu:
            raise InputError(
                f"--device {device}: this llama-cpp-python build has no GPU support; use --device cpu "
                "(or install a CUDA build of llama-cpp-python)"
            )
        self.gpu_layers = -1 if device != "cpu" and gpu else 0
        self.path = spec.path
        self.device = "cuda" if self.gpu_layers else "cpu"
        self._vocab = self._open(n_ctx=64, logits_all=False, vocab_only=True)
        self.tokenizer = _LlamaTokenizer(self._vocab)
        self.eos = [self.tokenizer.eos_token_id]
        self.llm = None
        self.n_ctx, self.logits_all = 0, False

    def _open(self, n_ctx: int, logits_all: bool, vocab_only: bool = False):
        try:
            with _quiet_fd2():
                return self._llama.Llama(
                    model_path=str(self.path),
                    n_ctx=n_ctx,
                    n_batch=min(512, n_ctx),
                    logits_all=logits_all,
                    vocab_only=vocab_only,
                    n_gpu_layers=self.gpu_layers,
                    n_threads=torch.get_num_threads(),  # OMP_NUM_THREADS / torch's choice, as for HF
                    seed=0,
                    verbose=False,
                )
        except (ValueError, RuntimeError) as e:
            raise ModelKindError(
                f"llama.cpp cannot load {self.path} ({e}); pass a GGUF file of a supported architecture"
            ) from None

    def prepare(self, n_ctx: int, logits_all: bool) -> None:
        """A context of n_ctx tokens (rounded up), reopened only when the need changes."""
        n_ctx = -(-n_ctx // 256) * 256
        if self.llm is None or self.n_ctx < n_ctx or self.logits_all != logits_all:
            self.llm = None
            self.llm = self._open(n_ctx, logits_all)
            self.n_ctx, self.logits_all = n_ctx, logits_all

    def nll(self, ds: Dataset, indices: list[int]) -> list[tuple[float, int]]:
        import numpy as np

        out = []
        for ids, labels in ds.read(indices):
            self.llm.reset()
            self.llm.eval(ids)
            pos = [k for k in range(1, len(ids)) if labels[k] != IGNORE]
            rows = np.asarray(self.llm.scores[[k - 1 for k in pos]], dtype=np.float32)  # logits before k
            top = rows.max(axis=1, keepdims=True)
            lse = top[:, 0].astype(np.float64) + np.log(np.exp(rows - top).sum(axis=1, dtype=np.float64))
            picked = rows[np.arange(len(pos)), [labels[k] for k in pos]].astype(np.float64)
            out.append((float((lse - picked).sum()), len(pos)))
        return out

    def generate(
        self,
        prompts: list[str],
        add_special: bool,
        max_new_tokens: int,
        stops: tuple[str, ...],
        sampling: Sampling | None = None,
    ) -> list[tuple[str, int]]:
        """Greedy (or sampled), token by token: at most max_new_tokens (llama-cpp-python's create_completion
        runs past its max_tokens while a multi-byte character is incomplete), counted as the HF
        backend counts them (an end-of-generation token included; none after a stop string)."""
        results = []
        for p in prompts:
            ids = self.tokenizer([p], add_special_tokens=add_special)["input_ids"][0]
            self.llm.reset()
            out: list[int] = []
            n, text = 0, ""
            if sampling is not None:
                self.llm.set_seed(sampling.next_seed())
            opts = sampling.llama_options() if sampling else {"top_k": 1, "top_p": 1.0, "temp": 0.0}
            gen = self.llm.generate(ids, min_p=0.0, repeat_penalty=1.0, **opts)
            for t in gen:
                n += 1
                if self._is_eog(t):
                    break
                out.append(t)
                text = self.llm.detokenize(out).decode("utf-8", errors="ignore")
                if n >= max_new_tokens or any(s in text for s in stops):
                    break
            gen.close()
            results.append((_cut(text, stops), n))
        return results

    def _is_eog(self, token: int) -> bool:
        return bool(self._llama.llama_vocab_is_eog(self.llm._model.vocab, token))

    def load(self) -> None:
        pass

    def close(self) -> None:
        self.llm = None
