"""EK-FAC fit + scores on a Hugging Face GPT-2 against kronfluence 1.0.1, same model, data and damping.

torchfluence takes ``GPT2LMHeadModel`` as it is (its ``Conv1D`` projections captured as
transposed Linear layers); kronfluence supports ``nn.Linear`` and ``nn.Conv2d`` only and
asks GPT-2 users to rewrite ``Conv1D`` as ``nn.Linear``, which :func:`conv1d_as_linear`
does on its copy (the outputs are checked equal). Both cover the same layers: every
block's ``c_attn``, ``attn.c_proj``, ``c_fc`` and ``mlp.c_proj`` (weights and biases);
the tied embedding / ``lm_head``, the position embedding and LayerNorm are left out of both.

Both use the token-summed next-token cross-entropy of a sequence as its loss (kronfluence's
documented language-modelling task) and as the query's measurement, the same Fisher
(``--fisher``: empirical by default, so that the factors are the same and the agreement
measures the implementations; "true" draws labels on both sides), and the same absolute
damping: kronfluence's heuristic, 0.1 x the mean corrected eigenvalue, computed once from
torchfluence's fit and passed to both. Correctness first (untimed, doubling as warm-up):
the Spearman and Pearson correlations of the two (n_queries, n_train) score matrices.
Then the two run alternately (``bench_peers.interleaved``) and medians are reported;
ratio = kronfluence time / torchfluence time.

    .bench-venv/bin/python benchmarks/bench_hf_ekfac.py [--layers 2] [--width 128] [--tokens 64]
        [--train 500] [--queries 50] [--batch 32] [--repeats 3] [--threads 2] [--profile] [--bf16]

``--bf16`` runs torchfluence with ``factor_dtype``, ``capture_dtype`` and ``score_dtype`` bf16 against both
kronfluence's float32 defaults and its all-low-precision bf16 settings (AMP), with every
agreement measured against kronfluence float32.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
import torchfluence as tfl  # noqa: E402
from _resnet9 import kronfluence_pairwise  # noqa: E402
from _timing import print_table  # noqa: E402
from bench_peers import interleaved, load, machine, pearson, quiet  # noqa: E402

LINEAR_NAMES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _without_torchvision() -> None:
    """Keeps transformers from importing torchvision, which it does whenever the package is installed.

    kronfluence requires torchvision but never imports it, and the wheel pip picks for the bench
    venv's CPU torch fails on import (``operator torchvision::nms does not exist``); nothing here
    needs it.
    """
    import transformers.utils
    import transformers.utils.import_utils

    transformers.utils.is_torchvision_available = transformers.utils.import_utils.is_torchvision_available = (
        lambda: False)


def gpt2(layers: int, width: int, tokens: int, vocab: int) -> nn.Module:
    _without_torchvision()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_positions=tokens, n_embd=width, n_layer=layers, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def conv1d_as_linear(model: nn.Module) -> nn.Module:
    """A copy of `model` with every Hugging Face ``Conv1D`` (weight (d_in, d_out)) as an ``nn.Linear``."""
    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            d_in, d_out = module.weight.shape
            linear = nn.Linear(d_in, d_out)
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def tracked_modules(layers: int) -> list[str]:
    return [f"transformer.h.{i}.{name}" for i in range(layers) for name in LINEAR_NAMES]


def token_data(n: int, tokens: int, vocab: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random token ids (n, T) and next-token labels, the last position masked with -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (n, tokens), generator=g)
    return ids, torch.cat([ids[:, 1:], torch.full((n, 1), -100)], dim=1)


def summed_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy summed over the batch's tokens (-100 ignored): kronfluence's task loss."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


def sequence_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The same per sequence, as torchfluence takes a loss: the batch's mean of each sequence's summed loss."""
    return summed_loss(logits, labels) / logits.shape[0]


def language_model_task(modules: list[str]):
    """kronfluence's language-modelling task: summed token losses, labels drawn from the model for the
    true Fisher, the summed loss as the measurement, and the tracked modules named."""
    from kronfluence.task import Task

    class LanguageModel(Task):
        def compute_train_loss(self, batch, model, sample=False):
            ids, labels = batch
            logits = model(input_ids=ids).logits
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach().float(), dim=-1)
                    drawn = torch.multinomial(probs.flatten(0, 1), num_samples=1).view(labels.shape)
                labels = torch.where(labels == -100, labels, drawn)
            return summed_loss(logits, labels)

        def compute_measurement(self, batch, model):
            ids, labels = batch
            return summed_loss(model(input_ids=ids).logits, labels)

        def get_influence_tracked_modules(self):
            return modules

    return LanguageModel()


def kronfluence_arguments(fisher: str, damping: float, amp: bool):
    """kronfluence's float32 defaults, or the all-low-precision bf16 settings of its examples (AMP)."""
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.common.factor_arguments import all_low_precision_factor_arguments
    from kronfluence.utils.common.score_arguments import all_low_precision_score_arguments

    if amp:
        factor_args = all_low_precision_factor_arguments(strategy="ekfac", dtype=torch.bfloat16)
        factor_args.use_empirical_fisher = fisher == "empirical"
        return factor_args, all_low_precision_score_arguments(damping_factor=damping, dtype=torch.bfloat16)
    return FactorArguments(use_empirical_fisher=fisher == "empirical"), ScoreArguments(damping_factor=damping)


def run_kronfluence(model, x, y, xq, yq, batch: int, damping: float, fisher: str, layers: int, amp: bool = False):
    factor_args, score_args = kronfluence_arguments(fisher, damping, amp)
    return kronfluence_pairwise(
        model, (x, y), (xq, yq), cpu=True, factor_batch=batch, query_batch=len(xq), train_batch=batch,
        factor_args=factor_args, score_args=score_args, task=language_model_task(tracked_modules(layers)))


def torchfluence_params(model: nn.Module, layers: int) -> list[str]:
    modules = tracked_modules(layers)
    return [name for name, _ in model.named_parameters() if name.rpartition(".")[0] in modules]


def run_torchfluence(model, x, y, xq, yq, batch: int, damping: float, fisher: str, layers: int,
                     low_precision: Optional[torch.dtype] = None):
    """EK-FAC fit + pairwise scores; `low_precision`: factor_dtype, capture_dtype and score_dtype (None: float32)."""
    began = time.perf_counter()
    im = tfl.EkfacInfluence(model, sequence_loss, damping, params=torchfluence_params(model, layers), fisher=fisher,
                            block_size=batch, factor_dtype=low_precision, capture_dtype=low_precision,
                            score_dtype=low_precision)
    im.fit(DataLoader(TensorDataset(x, y), batch_size=batch))
    fitted = time.perf_counter()
    scores = im.influences(xq, yq, x, y)
    done = time.perf_counter()
    return {"fit": fitted - began, "scores": done - fitted}, scores, im


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of the flattened matrices (ties are measure-zero for float scores)."""
    def ranks(t: Tensor) -> Tensor:
        return t.flatten().argsort().argsort().double()

    return pearson(ranks(a), ranks(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--train", type=int, default=500)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32, help="factor and training batch, both libraries")
    parser.add_argument("--fisher", choices=("empirical", "true"), default="empirical")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="cProfile one run of each, top lines printed")
    parser.add_argument("--bf16", action="store_true",
                        help="torchfluence with factor_dtype, capture_dtype and score_dtype bf16, against "
                             "kronfluence float32 "
                             "and kronfluence's AMP (all-low-precision bf16) settings; agreement against "
                             "kronfluence float32")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine()
    print(info, f"\nat start: {load()}", flush=True)

    model = gpt2(args.layers, args.width, args.tokens, args.vocab)
    peer_model = conv1d_as_linear(model)
    x, y = token_data(args.train, args.tokens, args.vocab, seed=1)
    xq, yq = token_data(args.queries, args.tokens, args.vocab, seed=2)
    with torch.no_grad():  # the rewrite must not change the model
        same = (model(input_ids=xq[:4]).logits - peer_model(input_ids=xq[:4]).logits).abs().max()
    assert float(same) < 1e-4, f"Conv1D -> Linear changed the logits by {float(same):.3g}"

    # kronfluence's damping heuristic (0.1 x the mean eigenvalue), fixed once for both.
    with quiet():
        fit = tfl.EkfacInfluence(model, sequence_loss, 0.0, params=torchfluence_params(model, args.layers),
                                 fisher=args.fisher, block_size=args.batch).fit(
            DataLoader(TensorDataset(x, y), batch_size=args.batch))
    eigenvalues = torch.cat([f.eigenvalues.flatten() for f in fit.factors.values()])
    damping = 0.1 * float(eigenvalues.mean())
    p = sum(fit.functions.sizes)
    config = (f"GPT2LMHeadModel, {args.layers} layers, width {args.width}, 4 heads, vocab {args.vocab}, "
              f"{args.tokens} tokens; {args.train} train x {args.queries} queries (random tokens); EK-FAC on the "
              f"{4 * args.layers} Conv1D/Linear layers ({p} parameters); batch {args.batch}; {args.fisher} Fisher; "
              f"damping {damping:.3g} (0.1 x mean eigenvalue) for both; {torch.get_num_threads()} threads")
    print(config, flush=True)

    # name -> (kronfluence AMP?, None) for the peer, (None, torchfluence's low precision) for ours
    variants = {"kronfluence": (False, None), "torchfluence": (None, None)}
    if args.bf16:
        variants = {"kronfluence": (False, None), "kronfluence AMP": (True, None), "torchfluence": (None, None),
                    "torchfluence bf16": (None, torch.bfloat16)}

    def run(name: str):
        amp, low = variants[name]
        if amp is not None:
            return run_kronfluence(peer_model, x, y, xq, yq, args.batch, damping, args.fisher, args.layers, amp)[:2]
        return run_torchfluence(model, x, y, xq, yq, args.batch, damping, args.fisher, args.layers, low)[:2]

    with quiet():
        scores = {name: run(name)[1] for name in variants}
    reference = scores["kronfluence"]
    agreement = {name: f"Spearman {spearman(reference, s):.4f}, Pearson {pearson(reference, s):.4f}"
                 for name, s in scores.items() if name != "kronfluence"}
    for name, text in agreement.items():
        print(f"agreement of {name} with kronfluence float32: {text}", flush=True)

    runs = {name: (lambda name=name: run(name)[0]) for name in variants}
    with quiet():
        medians = interleaved(runs, args.repeats)
    total = {name: m["fit"] + m["scores"] for name, m in medians.items()}
    peer = medians["kronfluence"]
    rows = [[name, f"{m['fit']:.2f}", f"{m['scores']:.2f}", f"{total[name]:.2f}",
             f"{peer['fit'] / m['fit']:.2f}x / {peer['scores'] / m['scores']:.2f}x / "
             f"{total['kronfluence'] / total[name]:.2f}x", agreement.get(name, "(reference)")]
            for name, m in medians.items()]
    print(f"\n{info}\nat end: {load()}\n{config}\nmedian of {args.repeats} interleaved rounds\n")
    print_table(["run", "fit s", "scores s", "fit + scores s", "kronfluence float32 / run (fit / scores / both)",
                 "agreement with kronfluence float32"], rows)
    if args.bf16:
        amp, ours = total["kronfluence AMP"], total["torchfluence bf16"]
        print(f"\nkronfluence AMP / torchfluence bf16, fit + scores: {amp / ours:.2f}x; "
              f"torchfluence float32 / torchfluence bf16: {total['torchfluence'] / ours:.2f}x "
              f"(fit {medians['torchfluence']['fit'] / medians['torchfluence bf16']['fit']:.2f}x)")

    if args.profile:
        for name, run in runs.items():
            profiler = cProfile.Profile()
            with quiet():
                profiler.runcall(run)
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
            print(f"\n-- {name}: top 15 by own time\n{text.getvalue()}")


if __name__ == "__main__":
    main()
