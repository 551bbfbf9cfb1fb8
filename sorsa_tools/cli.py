"""The `sorsa` command. Thin: parses options, draws progress, turns typed errors into one line."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sorsa_tools import __version__
from sorsa_tools.cli_common import (  # noqa: F401  (_said: tests and the interrupt handlers use it here)
    INTERRUPTED_DEFAULT,
    DataOpt,
    RevisionOpt,
    SplitOpt,
    SubsetOpt,
    _data_spec,
    _default_output,
    _fail,
    _interrupted_line,
    _said,
    _wrote,
    handle_errors,
)
from sorsa_tools.cli_display import (
    AnalyzeBar,
    DecomposeBars,
    MergeBar,
    TrainBar,
    analyze_rows,
    analyze_table,
    decompose_rows,
    err,
    human_bytes,
    inspect_rows,
    kv_table,
    live,
    lora_rows,
    out,
    plural,
    train_rows,
)
from sorsa_tools.errors import SorsaError

app = typer.Typer(
    help="SORSA fine-tuning tools: decompose a checkpoint into residual + singular factors, and more.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        out.print(f"sorsa-tools {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """SORSA fine-tuning tools."""


DECOMPOSE_EPILOG = """[bold]Examples[/]

  sorsa decompose meta-llama/Llama-2-7b-hf --rank 128 -o llama2-7b-sorsa-r128

  sorsa decompose meta-llama/Llama-2-7b --rank 128      (Meta's own format; -o ./Llama-2-7b-sorsa-r128)

  sorsa decompose ./gemma3-270m --rank 64 --targets q_proj,v_proj -o gemma-qv-r64

  sorsa decompose ./model --rank 64 --svd exact --residual-dtype float32 -o out

  sorsa decompose ./gemma3-270m --rank 64 --quantize nf4 --quant-iters 5 -o gemma-qsorsa-r64
      (QSORSA: the residual in bitsandbytes NF4, the factors absorb its error)
"""


@app.command(epilog=DECOMPOSE_EPILOG)
@handle_errors
def decompose(
    model: Annotated[
        str,
        typer.Argument(
            help="Hub id (org/name) or local checkpoint directory: HF safetensors, or Meta's original Llama "
            "format (consolidated.NN.pth, params.json, tokenizer.model)."
        ),
    ],
    rank: Annotated[int, typer.Option("--rank", "-r", help="SORSA rank r (top-r singular triplets).")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Output directory \\[default: ./NAME-sorsa-rRANK].")
    ] = None,
    revision: Annotated[str, typer.Option(help="Hub branch, tag or commit.")] = None,
    targets: Annotated[
        str, typer.Option(help="Comma-separated module names (q_proj,v_proj) or a regex on module names.")
    ] = None,
    svd: Annotated[
        str, typer.Option(help="auto (exact where cheap, else krylov), krylov, randomized or exact.")
    ] = "auto",
    oversample: Annotated[
        int, typer.Option(help="Extra block columns \\[default: 0 for krylov, rank for randomized].")
    ] = None,
    niter: Annotated[int, typer.Option(help="Krylov steps or power iterations (at least).")] = 4,
    svd_tol: Annotated[
        float, typer.Option(help="Iterate until the estimated relative error of S is below this (0: off).")
    ] = 5e-4,
    max_niter: Annotated[int, typer.Option(help="Most steps or iterations --svd-tol may ask for.")] = 24,
    seed: Annotated[int, typer.Option(help="Seed of the randomized sketch.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    compute_dtype: Annotated[str, typer.Option(help="SVD precision: float32 or float64.")] = "float32",
    factor_dtype: Annotated[str, typer.Option(help="Dtype of U, S, Vt in the adapter.")] = "float32",
    residual_dtype: Annotated[
        str, typer.Option(help="Dtype of W_r \\[default: each weight's source dtype].")
    ] = None,
    check_sample: Annotated[
        int, typer.Option(help="Modules that also get an exact SVD, to record the accuracy reached.")
    ] = 2,
    force: Annotated[
        bool, typer.Option("--force", help="Replace whatever the output directory holds.")
    ] = False,
    quantize: Annotated[
        str, typer.Option(help="Store W_r quantized: nf4 or int8 (bitsandbytes' format; QSORSA).")
    ] = None,
    quant_iters: Annotated[
        int, typer.Option(help="Rounds of quantize-then-refit the factors (QPiSSA's T; 5 is its strong one).")
    ] = 1,
    quant_block_size: Annotated[int, typer.Option(help="NF4 block size \\[default: 64].")] = None,
    double_quant: Annotated[
        bool, typer.Option("--double-quant/--no-double-quant", help="NF4: quantize the block scales too.")
    ] = True,
) -> None:
    """Split every target weight W into a residual W_r (an HF checkpoint) and factors U, S, Vt."""
    from sorsa_tools.decompose import decompose as run
    from sorsa_tools.outputs import decompose_output

    default_out = output is None
    output = _default_output(output, lambda: decompose_output(model, rank))
    with live("{task.description:<36.36}", "{task.fields[count]}") as p:
        r = run(
            model,
            rank,
            output,
            revision=revision,
            targets=targets,
            svd=svd,
            oversample=oversample,
            niter=niter,
            tol=svd_tol,
            max_niter=max_niter,
            seed=seed,
            device=device,
            compute_dtype=compute_dtype,
            factor_dtype=factor_dtype,
            residual_dtype=residual_dtype,
            check_sample=check_sample,
            force=force,
            progress=DecomposeBars(p),
            output_is_default=default_out,
            quantize=quantize,
            quant_iters=quant_iters,
            quant_block_size=quant_block_size,
            double_quant=double_quant,
        )
    _wrote(r.out_dir)
    for w in r.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    if r.already_done:
        out.print(
            f"[green]{r.out_dir} is already a finished decomposition of {model} with these settings.[/]"
        )
        return
    title = f"sorsa decompose → {r.out_dir}"
    out.print(kv_table(title, decompose_rows(r)))
    if r.resumed_shards:
        out.print(f"resumed: {r.resumed_shards} of {r.shards} shards were already done")


TRAIN_EPILOG = """[bold]Examples[/]

  sorsa train gemma-sorsa-r64 --data gsm8k/train.jsonl -o run1

  sorsa train llama2-sorsa-r128 --data metamath.jsonl --fields query,response --batch-size 4 \\
      --grad-accum 32 --lr 3e-5 --gamma 4e-4 --grad-checkpointing -o run2

  sorsa train DIR --data notes.jsonl --fields text --template raw --max-steps 500 -o run3

  sorsa train DIR --data meta-math/MetaMathQA --split "train[:100000]" --fields query,response -o run5

  sorsa train DIR --data chats.parquet -o run6      (messages records: the chat template, loss on assistant turns)

  sorsa train DIR --data gsm8k/train.jsonl -o run1 --resume      (continue an interrupted run)

  sorsa train DIR --data gsm8k/train.jsonl -o run1 --save-every 100 --keep-adapters
      (also keeps run1/steps/step-000100, step-000200, ...: each one a run that merge, eval
       and analyze take)

  torchrun --nproc_per_node 4 -m sorsa_tools.cli train DIR --data gsm8k/train.jsonl -o run4
      (data-parallel on 4 GPUs: --batch-size rows per GPU, only rank 0 writes run4)
"""


@app.command(epilog=TRAIN_EPILOG)
@handle_errors
def train(
    directory: Annotated[Path, typer.Argument(help="A decomposed directory (`sorsa decompose` output).")],
    data: DataOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory for the trained adapter.")],
    split: SplitOpt = None,
    subset: SubsetOpt = None,
    data_revision: RevisionOpt = None,
    fields: Annotated[
        str,
        typer.Option(
            help="PROMPT,RESPONSE or PROMPT,INPUT,RESPONSE fields, or one TEXT field \\[default: question,answer / query,response / instruction,input,output / ...]."
        ),
    ] = None,
    template: Annotated[
        str,
        typer.Option(
            help="paper (Listing 1), raw, chat (the tokenizer's template) or chatml; conversations "
            "(messages / conversations records) use the chat template unless chatml is given."
        ),
    ] = "paper",
    max_length: Annotated[int, typer.Option(help="Truncate examples to this many tokens.")] = 512,
    pack: Annotated[bool, typer.Option("--pack", help="Pack several examples into each sequence.")] = False,
    lr: Annotated[
        float,
        typer.Option(
            help="Peak learning rate (eta_max). SORSA's step on W is about 5x PEFT LoRA's at one lr, so a LoRA "
            "lr (3e-4) makes the first steps spike; 1e-4 was best over an epoch of GSM-8K on Gemma 3 270M."
        ),
    ] = 1e-4,
    gamma: Annotated[float, typer.Option(help="Orthonormal regularizer weight (0: off).")] = 4e-4,
    reg_tol: Annotated[
        float,
        typer.Option(
            help="No regularizer gradient for a factor while ||U^T U - I||_F is at most this (0: the paper's "
            "eq. 8; the fresh factors' deviation is float rounding, ~1e-5, whose gradient direction is noise)."
        ),
    ] = 0.0,
    reg_update: Annotated[
        str,
        typer.Option(
            help="eq10 (the official code: gamma / lr * grad L_reg added to the gradient AdamW steps on) or "
            "eq9 (the paper's eq. 9: a plain step gamma_t * grad L_reg beside AdamW's on the task loss)."
        ),
    ] = "eq10",
    lr_scaling: Annotated[
        str,
        typer.Option(
            help="How --lr is spread over U, S, Vt: none (the paper: one lr for all), sv (U's columns and "
            "Vt's rows at lr / s_i), pissa (lr / sqrt(s_i)), srel (S_i at lr * s_i), pissa+srel."
        ),
    ] = "none",
    optim: Annotated[
        str,
        typer.Option(
            help="adamw (float32 moments) or adamw8bit (bitsandbytes' 8-bit AdamW, QLoRA's: a quarter of "
            "the optimizer memory; with --lr-scaling none)."
        ),
    ] = "adamw",
    batch_size: Annotated[
        int, typer.Option(help="Sequences per micro-batch, per process (GPU) under torchrun.")
    ] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    max_steps: Annotated[
        int, typer.Option(help="Optimizer steps \\[default: --epochs over the data].")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the data (when --max-steps is not given).")] = 1,
    warmup_ratio: Annotated[float, typer.Option(help="Share of steps of linear warm-up.")] = 0.03,
    clip: Annotated[float, typer.Option(help="Clip the task gradient's norm to this (0: off).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of data order and initialisation.")] = 0,
    no_shuffle: Annotated[bool, typer.Option("--no-shuffle", help="Keep the file's order.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    dtype: Annotated[
        str,
        typer.Option(help="Dtype of the frozen model \\[default auto: bfloat16 on CUDA, float32 on CPU]."),
    ] = "auto",
    grad_checkpointing: Annotated[
        bool, typer.Option("--grad-checkpointing", help="Recompute activations in the backward pass.")
    ] = False,
    offload_residual: Annotated[
        bool,
        typer.Option(
            "--offload-residual",
            help="Keep the frozen W_r in host memory and stream it to the GPU (low VRAM).",
        ),
    ] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N optimizer steps.")] = 200,
    save_minutes: Annotated[
        float, typer.Option(help="Also checkpoint when this many minutes have passed (0: by steps only).")
    ] = 10.0,
    keep_adapters: Annotated[
        bool,
        typer.Option(
            "--keep-adapters",
            help="Also keep each checkpoint's adapter in RUN/steps/step-N (analyze a run's trajectory).",
        ),
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in -o from its checkpoint.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace the run in -o.")] = False,
) -> None:
    """Train only U, S and Vt of a decomposed model on a dataset (paper eq. 10)."""
    from contextlib import nullcontext

    from transformers.utils import logging as hf_logging

    from sorsa_tools.distributed import launch_rank
    from sorsa_tools.train import TrainConfig
    from sorsa_tools.train import train as run

    hf_logging.disable_progress_bar()
    _said["train_out"] = output
    quiet = launch_rank() != 0  # under torchrun only rank 0 reports; the library raises on every rank
    if quiet:
        hf_logging.set_verbosity_error()
    if offload_residual and not quiet:
        from sorsa_tools.device import resolve_device

        if resolve_device(device) == "cpu":
            err.print(
                "[yellow]warning:[/] --offload-residual saves GPU memory; on the CPU it only adds work: drop it",
                highlight=False,
            )
    cfg = TrainConfig(
        fields=fields,
        template=template,
        max_length=max_length,
        pack=pack,
        shuffle=not no_shuffle,
        lr=lr,
        gamma=gamma,
        reg_tol=reg_tol,
        reg_update=reg_update,
        lr_scaling=lr_scaling,
        optim=optim,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_steps=max_steps,
        epochs=epochs,
        warmup_ratio=warmup_ratio,
        clip=clip,
        seed=seed,
        dtype=dtype,
        grad_checkpointing=grad_checkpointing,
        offload_residual=offload_residual,
    )
    try:
        display = live("{task.description:<12}", "{task.fields[stats]}") if not quiet else nullcontext()
        with display as p:
            r = run(
                directory,
                _data_spec(data, split, subset, data_revision),
                output,
                config=cfg,
                device=device,
                save_every=save_every,
                resume=resume,
                force=force,
                compile=compile,
                progress=TrainBar(p) if not quiet else None,
                keep_adapters=keep_adapters,
                save_minutes=save_minutes,
            )
    except (SorsaError, KeyboardInterrupt) as e:
        if quiet and not getattr(e, "rank_local", False):  # rank 0 says it
            raise typer.Exit(getattr(e, "exit_code", 130)) from None
        raise
    _wrote(r.output_dir)
    if quiet:
        return
    if r.already_done:
        out.print(
            f"[green]{r.output_dir} already holds this finished run ({r.steps} steps).[/]", soft_wrap=True
        )
        return
    out.print(kv_table(f"sorsa train → {r.output_dir}", train_rows(r)))


MERGE_EPILOG = """[bold]Examples[/]

  sorsa merge gemma-sorsa-r64 --adapter run1 --to hf -o gemma-gsm8k

  sorsa merge gemma-sorsa-r64 --adapter run1 --to gguf --outtype q8_0 -o gemma-gsm8k.q8_0.gguf

  sorsa merge llama2-sorsa-r128 --adapter run2 --to gguf --outtype q4_k_m -o llama2-ft.q4_k_m.gguf

  sorsa merge gemma-sorsa-r64 --to hf -o gemma-back      (DIR's own adapter: the original model)

  sorsa merge gemma-sorsa-r64 --adapter run1 --to gguf      (-o ./gemma-sorsa-r64-run1.f16.gguf)
"""


def _size(text: str | None) -> int | None:
    """'2G', '500M', '1.5GB' or a byte count, for --split-max-size."""
    if text is None:
        return None
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}.get(t[-1:], 1)
    try:
        n = float(t[:-1] if t[-1:] in "KMGT" else t) * mult
    except ValueError:
        n = -1
    if n < 1:
        from sorsa_tools.errors import InputError

        raise InputError(f"--split-max-size {text!r} is not a size; write e.g. 2G or 500M")
    return int(n)


@app.command(epilog=MERGE_EPILOG)
@handle_errors
def merge(
    directory: Annotated[Path, typer.Argument(help="A decomposed directory (`sorsa decompose` output).")],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Output directory (hf) or .gguf file \\[default: ./DIR-RUN-merged, ./DIR-RUN.OUTTYPE.gguf].",
        ),
    ] = None,
    adapter: Annotated[
        Path, typer.Option(help="A `sorsa train` run \\[default: DIR's own adapter, the original model].")
    ] = None,
    to: Annotated[str, typer.Option("--to", help="hf (safetensors checkpoint) or gguf (llama.cpp).")] = "hf",
    dtype: Annotated[
        str, typer.Option(help="hf: float32, float16 or bfloat16 \\[default: the residual dtype].")
    ] = None,
    outtype: Annotated[
        str,
        typer.Option(
            help="gguf: f32, f16, bf16, q8_0, q4_0, q5_0, or a k-quant such as q4_k_m \\[default: f16]."
        ),
    ] = None,
    split_max_size: Annotated[
        str, typer.Option(help="gguf: split into files of at most this size (e.g. 2G).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Fold W = W_r + U diag(S) Vt into dense weights: an HF checkpoint or a GGUF file."""
    from sorsa_tools.merge import merge as run
    from sorsa_tools.outputs import merge_output

    output = _default_output(output, lambda: merge_output(directory, adapter, to, outtype))
    with live("{task.description:<40.40}", "{task.fields[count]}") as p:
        r = run(
            directory,
            output,
            adapter=adapter,
            to=to,
            dtype=dtype,
            outtype=outtype,
            split_max_size=_size(split_max_size),
            force=force,
            progress=MergeBar(p),
        )
    _wrote(r.out)
    for w in r.warnings or []:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    rows = [
        ("adapter", f"{adapter or directory} ({r.adapter})"),
        ("modules folded", str(r.modules)),
        ("tensors", str(r.tensors)),
        ("type", r.outtype if r.to == "gguf" else r.dtype),
        ("written", f"{r.bytes_written / 1e9:.2f} GB in {plural(len(r.files or []), 'file')}"),
        ("time", f"{r.seconds:.1f} s"),
    ]
    if r.max_fold_error is not None:
        rows.append(("max fold error (checked)", f"{r.max_fold_error:.1e}"))
    out.print(kv_table(f"sorsa merge --to {r.to} → {r.out}", rows))


EXPORT_LORA_EPILOG = """[bold]Examples[/]

  sorsa export-lora gemma-sorsa-r64 --adapter run1 -o gemma-gsm8k-lora

  sorsa export-lora llama2-sorsa-r128 --adapter run2 --dtype bfloat16 -o llama2-lora-bf16

  sorsa export-lora gemma-sorsa-r64 --adapter run1 --to gguf --outtype f16 \\
      --base gemma-3-270m.f16.gguf -o gemma-gsm8k-lora.f16.gguf

The LoRA (rank 2r, alpha 2r) applies to the ORIGINAL base model:
PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUT), vllm --lora-modules;
--to gguf: llama-cli -m BASE.gguf --lora OUT.gguf, where BASE.gguf is the original model's GGUF
(`sorsa merge DIR --to gguf`, DIR's own adapter; --base checks that it fits).
"""


@app.command(name="export-lora", epilog=EXPORT_LORA_EPILOG)
@handle_errors
def export_lora(
    directory: Annotated[Path, typer.Argument(help="The decomposed directory RUN was trained on.")],
    adapter: Annotated[Path, typer.Option("--adapter", help="A trained run (`sorsa train` output).")],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="PEFT dir or .gguf file \\[default: ./DIR-RUN-lora, ./DIR-RUN-lora.OUTTYPE.gguf].",
        ),
    ] = None,
    to: Annotated[
        str, typer.Option("--to", help="peft (a PEFT LoRA dir) or gguf (a llama.cpp adapter).")
    ] = "peft",
    dtype: Annotated[
        str, typer.Option(help="peft: float32, float16 or bfloat16 \\[default: float32].")
    ] = None,
    outtype: Annotated[str, typer.Option(help="gguf: f32, f16, bf16 or q8_0 \\[default: f16].")] = None,
    base: Annotated[
        Path,
        typer.Option(help="gguf: the original model's GGUF, checked (architecture, shapes) before writing."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier export in -o.")] = False,
) -> None:
    """Write a trained adapter as a LoRA (rank 2r) for the ORIGINAL base model: PEFT or llama.cpp GGUF."""
    from sorsa_tools.lora_export import export as run
    from sorsa_tools.outputs import lora_output

    output = _default_output(output, lambda: lora_output(directory, adapter, to, outtype))
    r = run(directory, adapter, output, to=to, dtype=dtype, outtype=outtype, base=base, force=force)
    for w in getattr(r, "warnings", None) or []:
        err.print(f"[yellow]warning:[/] {w}", highlight=False)
    written = getattr(r, "out_dir", None) or r.path
    _wrote(written)
    rows = lora_rows(r, to)
    out.print(kv_table(f"sorsa export-lora --to {to} → {written}", rows))


PUSH_EPILOG = """[bold]Examples[/]

  sorsa push gemma-gsm8k --repo-id alice/gemma-3-270m-sorsa-gsm8k

  sorsa push gemma-gsm8k.q8_0.gguf --repo-id alice/gemma-3-270m-sorsa-gsm8k-GGUF --private

  sorsa push gemma-gsm8k-lora --repo-id alice/gemma-sorsa-lora --revision r64

  sorsa push run1 --repo-id alice/gemma-sorsa-adapter --dry-run      (show the card and files, send nothing)

The token comes from HF_TOKEN or `hf auth login`. PATH is never modified: the model card is sent as
README.md from memory; a README.md of your own in PATH is sent instead unless --card overwrite.
"""


@app.command(epilog=PUSH_EPILOG)
@handle_errors
def push(
    path: Annotated[
        Path,
        typer.Argument(
            help="A merged HF dir, a .gguf file (or the first of a split set), a LoRA export, "
            "a trained run or a decomposed dir."
        ),
    ],
    repo_id: Annotated[str, typer.Option("--repo-id", help="Hub repository USER/NAME (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    revision: Annotated[
        str, typer.Option(help="Branch to push to, created if missing \\[default: main].")
    ] = None,
    card: Annotated[
        str,
        typer.Option(
            help="auto: generated README.md, or PATH's own README.md if it has one; overwrite: the "
            "generated card even then (PATH is not changed); skip: no generated card."
        ),
    ] = "auto",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the card and the files, send nothing.")
    ] = False,
) -> None:
    """Upload a SORSA artifact to the Hugging Face Hub with a model card written from its provenance."""
    from sorsa_tools.hub import push as run

    r = run(path, repo_id, private=private, revision=revision, dry_run=dry_run, card=card)
    if dry_run:
        if r.card is not None:
            out.rule("README.md (generated model card)")
            out.print(r.card, markup=False, highlight=False, soft_wrap=True)
            out.rule()
        files = Table(title=f"files for {r.repo_id}", show_header=True)
        files.add_column("file")
        files.add_column("size", justify="right")
        for name, size in r.files:
            files.add_row(name, human_bytes(size))
        out.print(files)
    card_note = {"generated": "generated", "user": f"{path}/README.md (yours)", "none": "none"}[r.card_source]
    rows = [
        ("kind", r.kind),
        ("repository", f"{r.repo_id} ({'private' if r.private else 'public if new'})"),
        ("revision", r.revision or "main"),
        ("files", f"{len(r.files)}, {human_bytes(r.bytes)}"),
        ("upload", "one commit" if r.method == "commit" else "large-folder upload, then the card"),
        ("model card", card_note),
        ("url", r.url),
    ]
    if dry_run:
        rows.append(("sent", "nothing (dry run)"))
    else:
        rows.append(("commit", r.commit or "(several commits)"))
    out.print(kv_table(f"sorsa push {'--dry-run ' if dry_run else ''}→ {r.repo_id}", rows))


ANALYZE_EPILOG = """[bold]Examples[/]

  sorsa analyze gemma-sorsa-r64 --adapter run1 --json analyze.json     (BASE: DIR's own adapter)

  sorsa analyze llama2-7b llama2-sorsa-r128 --adapter run-100 --adapter run-200 --adapter run-400

  sorsa analyze llama2-7b run1/steps/step-* run1      (one run over its steps: train --keep-adapters)

  sorsa analyze llama2-7b llama2-ft-merged --modules q_proj,v_proj --layers 0-7 --plot qv.png

  sorsa analyze BASE run1 --json - | jq .summary                  (JSON on stdout, no table)

Full float64 SVDs on the CPU, of BASE once and of each checkpoint, matrix by matrix. From SVD
times measured on Llama-2-7B shapes (4096x4096: 16 s, 4096x11008: 26 s with 2 threads; 6 s and 8.5 s
with 16): all 224 matrices take about 75 min per model on 2 cores, 25 min on 16 (float32: about
half), times (1 + checkpoints); --modules q_proj,v_proj alone: about 1/4 of that.
"""


@app.command(epilog=ANALYZE_EPILOG)
@handle_errors
def analyze(
    base: Annotated[
        Path, typer.Argument(help="The original model (HF dir), or its decomposed DIR (own adapter = base).")
    ],
    tuned: Annotated[
        list[Path],
        typer.Argument(
            metavar="[TUNED]...",
            help="Tuned models: merged HF dirs, trained runs, or the decomposed DIR that --adapter runs "
            "were trained on \\[default: BASE's DIR with --adapter].",
        ),
    ] = None,
    adapter: Annotated[
        list[Path],
        typer.Option("--adapter", metavar="RUN", help="A `sorsa train` run; repeat for several checkpoints."),
    ] = None,
    layers: Annotated[str, typer.Option(help="Only these layer indices, e.g. 0,3,10-12.")] = None,
    modules: Annotated[str, typer.Option(help="Only these modules: q_proj,v_proj or a regex.")] = None,
    precision: Annotated[
        str, typer.Option(help="SVD dtype: float64 or float32 (about 2x faster).")
    ] = "float64",
    json_out: Annotated[
        str, typer.Option("--json", help="Write the results as JSON to this file ('-': stdout, no table).")
    ] = None,
    plot_out: Annotated[
        Path,
        typer.Option(
            "--plot", help="Figure-2 PNG \\[default: the --json file with .png, else analyze.png here]."
        ),
    ] = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Write no PNG.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace existing --json / --plot files.")] = False,
) -> None:
    """How far tuning moved each matrix's singular values and vectors (paper eq. 1-4: ΔΣ, ΔD)."""
    import json

    from sorsa_tools.analyze import analyze as run
    from sorsa_tools.analyze import plot, write_json
    from sorsa_tools.io.safetensors_file import check_new_files, check_output_file

    to_stdout = json_out == "-"
    json_path = Path(json_out) if json_out and not to_stdout else None
    png = None
    if not no_plot:
        png = plot_out or (json_path.with_suffix(".png") if json_path else Path("analyze.png"))
    png_named = "--plot" if plot_out else ("--plot from --json" if json_path else "--plot's default")
    for path, flag, example in ((json_path, "--json", "analyze.json"), (png, "--plot", "analyze.png")):
        if path is not None:  # before hours of SVDs, not after
            check_output_file(path, flag, example)
    check_new_files([(p, n) for p, n in ((json_path, "--json"), (png, png_named)) if p is not None], force)
    with live("{task.description:<40.40}", "{task.fields[count]}") as p:
        r = run(
            base,
            tuned or [],
            adapter or [],
            layers=layers,
            modules=modules,
            precision=precision,
            progress=AnalyzeBar(p),
        )
    if json_path:
        _wrote(write_json(r, json_path))
    png_written = plot(r, png) if png else None
    _wrote(png_written)
    for p in (json_path, png_written):
        if p is not None:
            err.print(f"wrote {p}", highlight=False, soft_wrap=True)
    if to_stdout:
        out.print_json(json.dumps(r.to_json()))
        return
    out.print(analyze_table(r, Path(base).name))
    plot_row = str(png_written) if png_written else ("--no-plot" if no_plot else "no matplotlib")
    out.print(kv_table("sorsa analyze", analyze_rows(r, json_path, plot_row)))


@app.command(
    epilog="[bold]Examples[/]\n\n  sorsa inspect llama2-7b-sorsa-r128\n\n  sorsa inspect run1 --json"
)
@handle_errors
def inspect(
    directory: Annotated[Path, typer.Argument(help="A decomposed directory or a trained run.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Show what a decomposed directory or adapter holds: base model, rank, targets, dtypes, errors."""
    import json

    from sorsa_tools.info import describe

    d = describe(directory)
    if as_json:
        out.print_json(json.dumps(d))
        return
    out.print(kv_table(*inspect_rows(d)))


from sorsa_tools.cli_eval import eval_app  # noqa: E402

app.add_typer(eval_app, name="eval")


def _on_interrupt(signum, frame) -> None:
    """The first Ctrl-C stops the command; later ones must not cut its clean-up short."""
    _said["sigint"] = True
    signal.signal(signal.SIGINT, _while_stopping)
    raise KeyboardInterrupt


def _while_stopping(signum, frame) -> None:
    os.write(2, b"stopping: removing unfinished files, one moment\n")


_previous_unraisablehook = sys.__unraisablehook__
_resends: list[threading.Timer] = []


def _on_unraisable(unraisable) -> None:
    """A Ctrl-C raised inside a __del__ (or another place Python cannot raise into) is printed as
    "Exception ignored" and lost, and the command goes on with later Ctrl-Cs only saying "stopping".
    Instead: no traceback, Ctrl-C stops the command again, and the signal is sent once more from a
    helper thread so that it lands in the command's own code."""
    main = threading.current_thread() is threading.main_thread()
    if not (main and issubclass(unraisable.exc_type, KeyboardInterrupt)):
        _previous_unraisablehook(unraisable)
        return
    signal.signal(signal.SIGINT, _on_interrupt)
    again = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT))  # once this hook is over
    again.daemon = True
    again.start()
    _resends.append(again)  # cancelled when the command is over


def run(argv: list[str] | None = None, *, exiting: bool = False) -> int:
    """The `sorsa` command: returns its exit code. click's own usage errors (unknown option,
    missing argument) are one `error:` line too, not a box. `exiting`: the process ends after this,
    so Ctrl-C stays ignored from the moment the command is over (no gap where it could still land)."""
    # typer re-exports click's exceptions (and from 0.29 vendors click): find them through typer
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    # only where Ctrl-C has Python's own handler (not someone else's). The console script also takes
    # it when it arrives ignored (nohup, `cmd &`, CI runners): a SIGINT sent to a background run then
    # stops it cleanly, with the line and the exit code a foreground Ctrl-C gives
    handler = signal.getsignal(signal.SIGINT)
    owns_sigint = handler is signal.default_int_handler or (exiting and handler == signal.SIG_IGN)
    global _previous_unraisablehook
    if owns_sigint:
        _previous_unraisablehook = sys.unraisablehook
        signal.signal(signal.SIGINT, _on_interrupt)
        sys.unraisablehook = _on_unraisable
    _said["interrupted"] = _said["sigint"] = False
    try:
        code = app(args=argv, prog_name="sorsa", standalone_mode=False)
    except usage_error as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `sorsa`: the help, as click shows it
            out.print(e.ctx.get_help(), markup=False, highlight=False)
            return 2
        where = e.ctx.command_path if e.ctx is not None else "sorsa"
        words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
        if where == "sorsa" and words and words[0] in typer.main.get_command(app).commands:
            where = f"sorsa {words[0]}"  # click names no command for some option errors
        message = e.format_message().replace("\n", " ").rstrip(".")
        err.print(f"[bold red]error:[/] {message}; see '{where} --help'", highlight=False, soft_wrap=True)
        return 2
    except typer.Abort:
        err.print("[bold red]error:[/] aborted", highlight=False)
        return 1
    except KeyboardInterrupt:  # outside the command's own handling: typer's set-up or tear-down
        if not _said["interrupted"]:  # before the command began or after it was over
            err.print(f"[bold red]error:[/] {_interrupted_line('')}", highlight=False)
        return 130
    finally:
        if owns_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN if exiting else signal.default_int_handler)
            sys.unraisablehook = _previous_unraisablehook
            while _resends:
                _resends.pop().cancel()
    if code == 130 and not _said["interrupted"]:
        err.print(f"[bold red]error:[/] {INTERRUPTED_DEFAULT}", highlight=False)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
