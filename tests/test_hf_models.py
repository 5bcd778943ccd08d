"""Hugging Face transformers models as users bring them: tiny configs, random weights, float64.

GPT-2 (``Conv1D`` projections, a tied embedding and output layer, position ids of shape
(1, T)), Llama (RMSNorm, rotary embeddings, grouped-query attention), BERT (LayerNorm,
(1, T) position and token-type ids), and the vision ResNet (BatchNorm with trainable affine
parameters) and ViT (a class token and position embeddings as bare parameters). Every
model calls ``F.scaled_dot_product_attention`` (its default attention), whose fused
kernels have no second derivative. References are computed here with ``functional_call``
+ ``vmap(grad)`` and dense float64 Hessians, independently of the library.
"""

import warnings
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import torchfluence as tfl
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from tests.test_transformers import _layer_blocks as layer_blocks

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH, CLASSES = 50, 8, 3
REG = 0.1


# -- models and data -----------------------------------------------------------------------------------

def gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def llama() -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def bert() -> nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=CLASSES)
    return transformers.BertForSequenceClassification(config)


def resnet() -> nn.Module:
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       layer_type="basic", num_labels=CLASSES)
    return transformers.ResNetForImageClassification(config)


def vit() -> nn.Module:
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=16,
                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                    num_labels=CLASSES)
    return transformers.ViTForImageClassification(config)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def lm_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Token ids (n, T) and next-token targets, the last position masked with -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    return ids, torch.cat([ids[:, 1:], torch.full((n, 1), -100)], dim=1)


def text_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, LENGTH), generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def image_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)
    return x, torch.randint(0, CLASSES, (n,), generator=g)


FAMILIES: dict[str, tuple[Callable[[], nn.Module], Callable, Callable]] = {
    "gpt2": (gpt2, lm_loss, lm_data),
    "llama": (llama, lm_loss, lm_data),
    "bert": (bert, F.cross_entropy, text_data),
    "resnet": (resnet, F.cross_entropy, image_data),
    "vit": (vit, F.cross_entropy, image_data),
}


def build(family: str) -> tuple[nn.Module, Callable, Callable]:
    make, loss, data = FAMILIES[family]
    torch.manual_seed(0)
    model = make().double().eval()
    if family == "resnet":  # BatchNorm in eval mode with statistics that are not the identity
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    return model, loss, data


def quiet(solver, *args, **kwargs):
    """Builds a solver without the one-line coverage warning of K-FAC's defaults."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return solver(*args, **kwargs)


# -- independent references ----------------------------------------------------------------------------

def reference_grads(model: nn.Module, loss: Callable, x: Tensor, y: Tensor, names: list) -> Tensor:
    """Per-sample gradients over `names`, (n, p), by vmap(grad) of each sample alone."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def one(selected, xi, yi):
        out = functional_call(model, {**params, **buffers, **selected}, (xi.unsqueeze(0),))
        return loss(out.logits, yi.unsqueeze(0))

    with sdpa_kernel(SDPBackend.MATH):
        g = vmap(grad(one), in_dims=(None, 0, 0))({k: params[k] for k in names}, x, y)
    return torch.cat([g[k].flatten(1) for k in names], dim=1)


def reference_hessian(model: nn.Module, loss: Callable, x: Tensor, y: Tensor, names: list) -> Tensor:
    """Dense Hessian of the mean of per-sample losses over `names`, (p, p)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]

    def objective(flat):
        selected = {k: t.view(s) for k, t, s in zip(names, flat.split(sizes), shapes)}
        out = functional_call(model, {**params, **selected}, (x,)).logits
        return torch.stack([loss(out[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])]).mean()

    flat = torch.cat([params[k].reshape(-1) for k in names])
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(objective, flat)


# -- per-sample gradients ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_per_sample_gradients_of_every_parameter_equal_torch_func(family):
    """Captured layers (Conv1D, embeddings on (1, T) ids, convolutions, Linear) and, through
    torch.func beside them, LayerNorm, RMSNorm, BatchNorm and bare parameters."""
    model, loss, data = build(family)
    x, y = data(6, seed=1)
    im = tfl.GradientSimilarity(model, loss)
    captured = {type(layer.module).__name__ for layer in im.source.layers}
    expected_types = {"gpt2": {"Embedding", "Conv1D", "Linear"}, "llama": {"Embedding", "Linear"},
                      "bert": {"Embedding", "Linear"}, "resnet": {"Conv2d", "Linear"}, "vit": {"Conv2d", "Linear"}}
    assert captured == expected_types[family]
    assert im.source.rest is not None  # the norm layers' (and ViT's bare) parameters go through torch.func
    expected = reference_grads(model, loss, x, y, im.functions.names)
    # float64 sums of the same terms in other orders.
    torch.testing.assert_close(im.grads(x, y), expected, rtol=1e-9, atol=1e-12)


def test_position_ids_of_shape_1_by_t_get_their_exact_per_sample_gradient():
    model, loss, data = build("gpt2")
    x, y = data(5, seed=2)
    im = tfl.GradientSimilarity(model, loss, params=["transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight"])
    assert [layer.name for layer in im.source.layers] == ["transformer.wpe", "transformer.h.0.attn.c_attn"]
    assert im.source.rest is None
    torch.testing.assert_close(im.grads(x, y), reference_grads(model, loss, x, y, im.functions.names),
                               rtol=1e-9, atol=1e-12)


# -- K-FAC and EK-FAC ----------------------------------------------------------------------------------

def _layer_blocks(model: nn.Module, g: Tensor, names: list) -> dict:
    """Per-sample gradients (n, p) -> {module: (n, d_out, d_in [+ 1])}; Conv1D and Embedding stored (d_in, d_out)."""
    return layer_blocks(model, g, names, transposed=(nn.Embedding, transformers.pytorch_utils.Conv1D))


def test_ekfac_defaults_on_gpt2_leave_out_layernorm_and_the_tied_embedding_in_one_line():
    model, loss, _ = build("gpt2")
    with pytest.warns(UserWarning) as record:
        im = tfl.EkfacInfluence(model, loss, REG)
    lines = [str(w.message) for w in record if "EkfacInfluence covers" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("EkfacInfluence covers 9 captured layers (Conv1D, Embedding; ")
    assert "LayerNorm (not a captured layer type): 10 parameter(s)" in lines[0]
    assert "tied weights (shared by several layers): 1 parameter(s) such as transformer.wte.weight" in lines[0]
    assert not any("ln_" in n or n == "transformer.wte.weight" for n in im.functions.names)
    with pytest.raises(ValueError, match=r"transformer.h.0.ln_1.weight \(LayerNorm: type not registered\)"):
        tfl.EkfacInfluence(model, loss, REG, params=["transformer.h.0.ln_1.weight", "transformer.wpe.weight"])


def test_ekfac_equals_its_formula_on_gpt2s_captured_layers():
    """Eigenvalues = E[(Q_S^T G Q_A)^2] per layer (Conv1D stored transposed, the position embedding
    on shared (1, T) ids), and scores equal the block-diagonal inverse built from them."""
    model, loss, data = build("gpt2")
    x, y = data(16, seed=3)
    xt, yt = data(3, seed=4)
    im = quiet(tfl.EkfacInfluence, model, loss, REG, fisher="empirical").fit((x, y))
    names = im.functions.names
    train = _layer_blocks(model, reference_grads(model, loss, x, y, names), names)
    test = _layer_blocks(model, reference_grads(model, loss, xt, yt, names), names)
    assert set(train) == set(im.factors)
    expected = torch.zeros(3, 16, dtype=torch.float64)
    for name, f in im.factors.items():
        q_s, q_a = f.gradient_eigenvectors, f.activation_eigenvectors
        if q_a is None:  # an embedding: the token basis
            q_a = torch.eye(train[name].shape[2], dtype=torch.float64)
        rotated = q_s.T @ train[name] @ q_a
        # Both sides: the mean of squares of the same float64 rotations, summed in another order.
        torch.testing.assert_close(f.eigenvalues, rotated.square().mean(dim=0), rtol=1e-9, atol=1e-15)
        expected += torch.einsum("qoi,noi->qn", (q_s.T @ test[name] @ q_a) / (f.eigenvalues + REG), rotated)
    torch.testing.assert_close(im.influences(xt, yt, x, y), expected, rtol=1e-9, atol=1e-12)


def test_kfac_factors_on_gpt2s_conv1d_layers_equal_their_covariances():
    """K-FAC's eigenvalues are l_S l_A^T of A = E[sum_t a a^T] and S = E[sum_t g g^T] / T, with a and g
    read here by hooks of this test on the Conv1D layers."""
    model, loss, data = build("gpt2")
    x, y = data(12, seed=5)
    im = quiet(tfl.KfacInfluence, model, loss, REG, fisher="empirical").fit((x, y))
    conv = {name: m for name, m in model.named_modules() if isinstance(m, transformers.pytorch_utils.Conv1D)}
    inputs, outputs = {}, {}

    def record(module, args, output):
        name = names[module]
        inputs[name], outputs[name] = args[0], output

    names = {m: name for name, m in conv.items()}
    handles = [m.register_forward_hook(record) for m in conv.values()]
    logits = model(x).logits
    for h in handles:
        h.remove()
    total = sum(lm_loss(logits[i:i + 1], y[i:i + 1]) for i in range(x.shape[0]))  # each sample's own loss
    grads = dict(zip(conv, torch.autograd.grad(total, [outputs[name] for name in conv])))
    n = x.shape[0]
    for name in conv:
        a = torch.cat([inputs[name], torch.ones(n, LENGTH, 1, dtype=torch.float64)], dim=-1).detach()
        a_fac = torch.einsum("nti,ntj->ij", a, a) / n
        s_fac = torch.einsum("nto,ntp->op", grads[name], grads[name]) / (n * LENGTH)
        expected = torch.outer(torch.linalg.eigvalsh(s_fac).clamp_min(0), torch.linalg.eigvalsh(a_fac).clamp_min(0))
        torch.testing.assert_close(im.factors[name].eigenvalues, expected, rtol=1e-8, atol=1e-13)


def test_kfac_on_a_resnet_with_trainable_batchnorm():
    model, loss, data = build("resnet")
    x, y = data(12, seed=6)
    with pytest.warns(UserWarning, match=r"KfacInfluence covers 7 captured layers \(Conv2d, Linear; .* BatchNorm2d "
                                         r"\(not a captured layer type\): 12 parameter"):
        im = tfl.KfacInfluence(model, loss, REG)
    scores = im.fit((x, y)).influences(x[:2], y[:2], x, y)
    assert scores.shape == (2, 12) and bool(torch.isfinite(scores).all())


# -- every solver with its defaults --------------------------------------------------------------------

SOLVERS = {
    "ekfac": lambda m, loss: tfl.EkfacInfluence(m, loss, REG),
    "kfac": lambda m, loss: tfl.KfacInfluence(m, loss, REG),
    # Random-weight models have indefinite Hessians: CG and Arnoldi refuse them (rightly) at
    # this regularization, so they run on the Gauss-Newton matrix, through the same attention.
    "cg": lambda m, loss: tfl.CgInfluence(m, loss, REG, second_order="gauss_newton"),
    "arnoldi": lambda m, loss: tfl.ArnoldiInfluence(m, loss, REG, second_order="gauss_newton", rank=8),
    "gradient_similarity": lambda m, loss: tfl.GradientSimilarity(m, loss),
}


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_solver_runs_with_its_defaults(family, solver):
    check_solver_runs(family, SOLVERS[solver])


def check_solver_runs(family: str, make: Callable) -> None:
    """make(model, loss) fitted on 16 samples scores 3 queries: finite, (3, 16)."""
    model, loss, data = build(family)
    x, y = data(16, seed=7)
    xt, yt = data(3, seed=8)
    scores = quiet(make, model, loss).fit((x, y)).influences(xt, yt, x, y)
    assert scores.shape == (3, 16) and bool(torch.isfinite(scores).all())


@pytest.mark.parametrize("family", ["gpt2", "llama", "vit"])
def test_direct_hessian_through_attention_equals_a_dense_inverse(family):
    """Double backward through scaled_dot_product_attention: the Hessian on a parameter subset
    (an attention projection and a norm layer's weight) against a dense float64 inverse."""
    model, loss, data = build(family)
    subset = {"gpt2": ["transformer.h.0.attn.c_attn.bias", "transformer.h.1.ln_1.weight"],
              "llama": ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.input_layernorm.weight"],
              "vit": ["vit.layers.0.attention.q_proj.bias", "vit.layers.1.layernorm_before.weight"]}[family]
    x, y = data(8, seed=9)
    xt, yt = data(2, seed=10)
    reg = 5.0  # above the indefinite Hessian's most negative eigenvalue on this random model
    im = tfl.DirectInfluence(model, loss, reg, params=subset).fit((x, y))
    h = reference_hessian(model, loss, x, y, subset)
    g, gt = reference_grads(model, loss, x, y, subset), reference_grads(model, loss, xt, yt, subset)
    expected = torch.linalg.solve(h + reg * torch.eye(h.shape[0], dtype=torch.float64), gt.T).T @ g.T
    torch.testing.assert_close(im.influences(xt, yt, x, y), expected, rtol=1e-7, atol=1e-10)


# -- batches and losses as users have them -------------------------------------------------------------

def output_loss(output, batch):
    """A loss of the model's raw output and the batch, as kronfluence's task computes it."""
    return lm_loss(output.logits, batch["labels"])


@pytest.mark.parametrize("loss_of", ["logits", "output"])
@pytest.mark.parametrize("solver", ["gradient_similarity", "ekfac", "direct"])
def test_dict_batches_give_the_results_of_the_pair_form(solver, loss_of):
    """A DataLoader of {"input_ids", "attention_mask", "labels"} dicts (inputs passed as keyword arguments),
    queries given as a dict too, with loss(logits, targets) or loss(output, batch)."""
    model, loss, data = build("gpt2")
    x, y = data(12, seed=11)
    xt, yt = data(3, seed=12)
    rows = [{"input_ids": x[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": y[i]}
            for i in range(12)]
    queries = {"input_ids": xt, "attention_mask": torch.ones_like(xt), "labels": yt}
    make = {"gradient_similarity": lambda f: tfl.GradientSimilarity(model, f),
            "ekfac": lambda f: quiet(tfl.EkfacInfluence, model, f, REG),
            "direct": lambda f: tfl.DirectInfluence(model, f, REG, second_order="gauss_newton",
                                                    params=["transformer.h.1.mlp.c_fc.bias", "transformer.ln_f.weight"])}
    expected = make[solver](loss).fit((x, y)).influences(xt, yt, x, y)
    im = make[solver](loss if loss_of == "logits" else output_loss).fit(DataLoader(rows, batch_size=5))
    assert im.functions.loss_style == ("targets" if loss_of == "logits" else "batch")
    # The same float64 products over blocks of other sizes.
    torch.testing.assert_close(im.influences(queries, None), im.influences(queries, None))
    torch.testing.assert_close(im.influences(queries, None, *tfl.split_batch(default_collate(rows))), expected,
                               rtol=1e-9, atol=1e-12)


def test_tuple_batches_pass_positional_inputs():
    model, loss, data = build("bert")
    x, y = data(10, seed=13)
    mask = torch.ones_like(x)
    mask[::2, -2:] = 0  # padded ends: BERT's mask branches on its values, so torch.func goes sample by sample
    im = tfl.GradientSimilarity(model, loss)
    got = im.grads(*tfl.split_batch((x, mask, y)))
    assert im.functions.loss_style == "targets" and im.source.rest.loop_samples
    names = im.functions.names
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, ids, m, t):
        return loss(functional_call(model, {**params, **p}, (ids[None], m[None])).logits, t[None])

    reference = []
    for i in range(10):  # one autograd gradient per sample: the mask's branches need no vmap here
        selected = {k: params[k].clone().requires_grad_(True) for k in names}
        reference.append(torch.cat([g.flatten() for g in torch.autograd.grad(
            one(selected, x[i], mask[i], y[i]), list(selected.values()))]))
    reference = torch.stack(reference)
    torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-12)


def test_a_loss_that_fails_both_ways_says_which_styles_were_tried():
    model, _, data = build("gpt2")
    x, y = data(4, seed=14)

    def broken(output, batch):
        return output.logits.sum() + batch["missing"].sum()

    with pytest.raises(TypeError, match=r"loss failed on a dict batch .*called as loss\(logits, targets\) with the "
                                        r"batch's 'labels'.*: AttributeError.*; as loss\(output, batch\) with the "
                                        r"model's output and the batch as given: KeyError: 'missing'"):
        tfl.GradientSimilarity(model, broken).fit(DataLoader(
            [{"input_ids": x[i], "labels": y[i]} for i in range(4)], batch_size=2))
