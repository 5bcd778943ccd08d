"""torchfluence.ptif: the pytorch-influence-functions API, against the exact oracle and leave-one-out retraining."""

import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchfluence.ptif as ptif
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .digits import cnn, digits, exact_hessian, exact_influences, loader, mlp, rel_error, train


def readme_script(get_my_model, get_my_dataloaders):
    """The usage example of pytorch-influence-functions' README, with only the import changed."""
    import torchfluence.ptif as ptif

    # Supplied by the user:
    model = get_my_model()
    trainloader, testloader = get_my_dataloaders()

    ptif.init_logging()
    config = ptif.get_default_config()

    influences, harmful, helpful = ptif.calc_img_wise(config, model, trainloader, testloader)

    # do someting with influences/harmful/helpful
    return influences, harmful, helpful


@pytest.fixture(scope="module")
def cnn_problem():
    x, y, xt, yt = digits(n_train=200, n_test=60, dtype=torch.float32, image=True)
    model = train(cnn(torch.float32), x, y, steps=150)
    return model, x, y, xt, yt


def test_readme_script_runs_unchanged(cnn_problem, tmp_path, monkeypatch):
    model, x, y, xt, yt = cnn_problem
    monkeypatch.chdir(tmp_path)
    train_loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    test_loader = DataLoader(TensorDataset(xt, yt), batch_size=16)

    influences, harmful, helpful = readme_script(lambda: model, lambda: (train_loader, test_loader))

    first_of_class = [int((yt == c).nonzero()[0]) for c in range(10)]  # test_sample_num=1 per class
    assert list(influences) == [str(i) for i in first_of_class]
    for position, (key, entry) in enumerate(influences.items()):
        assert set(entry) == {"label", "num_in_dataset", "time_calc_influence_s", "influence", "harmful", "helpful"}
        assert entry["label"] == int(yt[int(key)]) and isinstance(entry["label"], int)
        assert entry["num_in_dataset"] == position
        assert entry["time_calc_influence_s"] > 0
        assert len(entry["influence"]) == len(x) and all(np.isfinite(entry["influence"]))
        assert sorted(entry["harmful"]) == list(range(len(x))) and entry["helpful"] == entry["harmful"][::-1]
        assert entry["influence"][entry["harmful"][0]] == max(entry["influence"])
    assert sorted(harmful) == list(range(len(x))) and helpful == harmful[::-1]
    mean = np.mean([entry["influence"] for entry in influences.values()], axis=0)
    assert harmful[0] == int(np.argmax(mean)) and helpful[0] == int(np.argmin(mean))

    outdir = tmp_path / "outdir"
    assert sorted(os.listdir(outdir)) == ["influence_results_0_1.json", "influences_results_meta_0-1.json"]
    assert json.loads((outdir / "influence_results_0_1.json").read_text()) == influences
    meta = json.loads((outdir / "influences_results_meta_0-1.json").read_text())
    assert meta["test_sample_index_list"] == first_of_class and meta["recursion_depth"] == 5000
    # Even at the default 5000 steps LiSSA has not fully converged (its slowest mode decays
    # like (1 - damp / scale)^t), but it must point the same way as the exact answer.
    exact = -exact_influences(copy.deepcopy(model).double(), F.cross_entropy, 0.01, x.double(), y,
                              xt[first_of_class].double(), yt[first_of_class]) / len(x)
    got = torch.tensor([entry["influence"] for entry in influences.values()], dtype=torch.float64)
    assert torch.corrcoef(torch.stack([got.flatten(), exact.flatten()]))[0, 1] > 0.9


def test_direct_solver_equals_the_exact_oracle(tmp_path):
    x, y, xt, yt = digits(n_train=150, n_test=40, image=True)
    model = train(cnn(), x, y, steps=150)
    config = {**ptif.get_default_config(), "outdir": str(tmp_path), "solver": "direct", "damp": 0.05,
              "test_sample_num": 2, "test_start_index": 1}
    influences, harmful, _ = ptif.calc_img_wise(config, model, loader(x, y, 64), loader(xt, yt, 64))

    chosen = [int(i) for c in range(10) for i in (yt == c).nonzero()[1:3, 0]]  # 2nd and 3rd of each class
    assert [int(k) for k in influences] == chosen
    exact = -exact_influences(model, F.cross_entropy, 0.05, x, y, xt[chosen], yt[chosen]) / len(x)
    got = torch.tensor([e["influence"] for e in influences.values()], dtype=torch.float64)
    # Both are float64 dense solves (cond(H + 0.05 I) ~ 1e2): machine precision times that.
    assert rel_error(got, exact) < 1e-9
    assert harmful[:20] == torch.argsort(exact.mean(0), descending=True)[:20].tolist()


def test_lissa_honours_damp_and_scale_and_converges(tmp_path):
    x, y, xt, yt = digits(n_train=150, n_test=40)
    model = train(mlp(), x, y, steps=150)
    damp = 0.2
    hessian = exact_hessian(model, F.cross_entropy, x, y)
    scale = 1.2 * float(torch.linalg.eigvalsh(hessian)[-1] + damp)
    exact = -exact_influences(model, F.cross_entropy, damp, x, y, xt, yt, curvature=hessian) / len(x)
    full_batch = loader(x, y, len(x))  # one batch: the recursion is deterministic

    def run(depth, train_loader, r=1):
        config = {**ptif.get_default_config(), "outdir": str(tmp_path), "damp": damp, "scale": scale,
                  "recursion_depth": depth, "r_averaging": r, "test_sample_num": False}
        influences, _, _ = ptif.calc_img_wise(config, model, train_loader, loader(xt, yt))
        return torch.tensor([e["influence"] for e in influences.values()], dtype=torch.float64)

    # The error decays like (1 - (lambda_min + damp) / scale)^depth <= (1 - 0.2 / scale)^depth.
    shallow, deep = rel_error(run(20, full_batch), exact), rel_error(run(600, full_batch), exact)
    assert deep < 1e-6 < shallow
    # With minibatches of 25 the estimate is noisy; averaging r = 3 runs keeps it close.
    assert rel_error(run(600, loader(x, y, 25), r=3), exact) < 0.1


def test_harmful_and_helpful_agree_with_leave_one_out_retraining(tmp_path):
    x, y, xt, yt = digits(n_train=120, n_test=8, seed=3)
    # The training objective is (1/n) sum of the kept samples' losses + decay/2 |theta|^2, with n
    # the full size: leaving z_j out is then exactly up-weighting it by -1/n, and the Hessian
    # is H + decay I, so damp = decay.
    decay = 0.05

    def fit(keep):
        model = nn.Linear(64, 10).double()
        nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
        opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12,
                                tolerance_change=1e-15, history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = F.cross_entropy(model(x[keep]), y[keep], reduction="sum") / len(x) + 0.5 * decay * sum(
                (p ** 2).sum() for p in model.parameters())
            value.backward()
            return value

        opt.step(closure)
        return model.eval()

    def test_loss(model):
        with torch.no_grad():
            return float(F.cross_entropy(model(xt), yt))

    everyone = torch.arange(len(x))
    model = fit(everyone)
    config = {**ptif.get_default_config(), "outdir": str(tmp_path), "solver": "direct", "damp": decay,
              "test_sample_num": False}
    influences, harmful, helpful = ptif.calc_img_wise(config, model, loader(x, y), loader(xt, yt))
    mean = np.mean([e["influence"] for e in influences.values()], axis=0)

    base = test_loss(model)
    checked = harmful[:4] + helpful[:4]
    actual = np.array([test_loss(fit(everyone[everyone != j])) - base for j in checked])
    predicted = -mean[checked]  # removing z_j changes the mean test loss by about -influence[j]
    assert (actual[:4] < 0).all() and (actual[4:] > 0).all(), (actual, predicted)
    # A convex model: the first-order prediction misses only the second-order term, which
    # makes the actual change 0-30% larger here (measured 8-26% at decay 0.05).
    assert np.corrcoef(actual, predicted)[0, 1] > 0.98
    assert np.all(np.abs(actual / predicted - 1) < 0.35), actual / predicted


def test_calc_all_grad_then_test_saves_resumes_and_refuses_mixing(tmp_path):
    x, y, xt, yt = digits(n_train=100, n_test=30)
    model = train(mlp(), x, y, steps=100)
    config = {**ptif.get_default_config(), "outdir": str(tmp_path / "out"), "save_pth": str(tmp_path / "save"),
              "solver": "direct", "damp": 0.05, "test_sample_num": 1, "batch_size": 32}
    reference, ref_harmful, _ = ptif.calc_img_wise({**config, "outdir": str(tmp_path / "ref")}, model,
                                                   loader(x, y), loader(xt, yt))
    influences, harmful, helpful = ptif.calc_all_grad_then_test(config, model, loader(x, y), loader(xt, yt))
    for key, entry in reference.items():
        assert np.allclose(influences[key]["influence"], entry["influence"], rtol=1e-10, atol=1e-14)
    assert harmful == ref_harmful

    save = tmp_path / "save"
    blocks = sorted(p.name for p in (save / "grad_z").iterdir())
    assert blocks == ["0-32.grad_z", "32-64.grad_z", "64-96.grad_z", "96-100.grad_z"]
    assert len(list((save / "s_test").iterdir())) == len(reference)
    results = json.loads((tmp_path / "out" / "influence_results.json").read_text())
    assert set(results) == {"influences", "harmful", "helpful", "per_test"} and results["harmful"] == harmful

    # Resume: a lost block and a lost s_test are recomputed, the other files are reused as they are.
    (save / "grad_z" / "32-64.grad_z").unlink()
    lost_s_test = sorted((save / "s_test").iterdir())[0]
    lost_s_test.unlink()
    kept = save / "grad_z" / "0-32.grad_z"
    stamp = kept.stat().st_mtime_ns
    again, _, _ = ptif.calc_all_grad_then_test(config, model, loader(x, y), loader(xt, yt))
    assert kept.stat().st_mtime_ns == stamp and lost_s_test.exists()
    assert all(np.allclose(again[k]["influence"], influences[k]["influence"], rtol=1e-12) for k in influences)

    with torch.no_grad():
        model[0].weight.add_(0.01)
    with pytest.raises(ValueError, match="another run"):
        ptif.calc_all_grad_then_test(config, model, loader(x, y), loader(xt, yt))


def test_lower_level_functions(tmp_path):
    x, y, xt, yt = digits(n_train=80, n_test=10)
    model = train(mlp(), x, y, steps=100)
    damp = 0.1
    hessian = exact_hessian(model, F.cross_entropy, x, y)
    scale = 1.2 * float(torch.linalg.eigvalsh(hessian)[-1] + damp)

    params = list(model.parameters())
    expected = torch.autograd.grad(F.cross_entropy(model(xt[:3]), yt[:3]), params)
    got = ptif.grad_z(xt[:3], yt[:3], model)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=0) and not a.requires_grad for a, b in zip(got, expected))

    v = torch.cat([g.reshape(-1) for g in expected])
    exact = torch.linalg.solve(hessian + damp * torch.eye(len(v), dtype=v.dtype), v)
    estimate = ptif.s_test(xt[:3], yt[:3], model, loader(x, y, len(x)), damp=damp, scale=scale,
                           recursion_depth=400)
    assert rel_error(torch.cat([e.reshape(-1) for e in estimate]), exact) < 1e-6

    influence, harmful, helpful, test_id = ptif.calc_influence_single(
        model, loader(x, y, len(x)), loader(xt, yt), 4, -1, 400, 1, damp=damp, scale=scale)
    row = -exact_influences(model, F.cross_entropy, damp, x, y, xt[4:5], yt[4:5], curvature=hessian)[0] / len(x)
    assert test_id == 4 and rel_error(torch.tensor(influence), row) < 1e-6
    assert harmful[0] == int(row.argmax()) and helpful[0] == int(row.argmin())

    grad_zs, _ = ptif.calc_grad_z(model, loader(x, y), start=70)
    assert len(grad_zs) == 10 and torch.allclose(grad_zs[0][0], ptif.grad_z(x[70:71], y[70:71], model)[0])
    _, folder = ptif.calc_grad_z(model, loader(x, y), save_pth=str(tmp_path / "g"), start=78)
    assert sorted(p.name for p in folder.iterdir()) == ["78.grad_z", "79.grad_z"]
    s_tests, _ = ptif.calc_s_test(model, loader(xt, yt), loader(x, y, len(x)), damp=damp, scale=scale,
                                  recursion_depth=400, start=8)
    assert len(s_tests) == 2


class NumpyLabels(Dataset):
    """Labels as NumPy integers, as many image datasets return them."""

    def __init__(self, x, y):
        self.x, self.y = x, y.numpy()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_results_are_json_whatever_the_label_type(tmp_path):
    x, y, xt, yt = digits(n_train=60, n_test=20)
    model = train(mlp(), x, y, steps=50)
    config = {**ptif.get_default_config(), "outdir": str(tmp_path), "solver": "direct", "damp": 0.1,
              "num_harmful_helpful": 5}
    influences, _, _ = ptif.calc_img_wise(config, model, DataLoader(NumpyLabels(x, y), batch_size=16),
                                          DataLoader(NumpyLabels(xt, yt), batch_size=16))
    assert json.loads(json.dumps(influences)) == influences
    assert all(isinstance(e["label"], int) and len(e["harmful"]) == 5 for e in influences.values())


@pytest.mark.parametrize("change, message", [
    ({"damp": -1.0}, r"config\['damp'\] must be a finite number >= 0, got -1.0"),
    ({"scale": 0}, r"config\['scale'\] must be > 0"),
    ({"solver": "newton"}, r"config\['solver'\] must be one of .*got 'newton'"),
    ({"r": 2, "r_averaging": 3}, "r_averaging and r are the same setting but disagree"),
    ({"test_start_index": 1, "test_sample_start_per_class": 2}, "disagree"),
    ({"gpu": -2}, r"config\['gpu'\] must be -1 \(CPU\) or a CUDA device index >= 0, got -2"),
    ({"recursion_depth": 0}, r"config\['recursion_depth'\] must be an int >= 1, got 0"),
    ({"test_sample_num": 5, "test_start_index": 100}, "no test samples selected"),
])
def test_bad_config_is_a_clear_error(tmp_path, change, message):
    x, y, xt, yt = digits(n_train=40, n_test=20)
    config = {**ptif.get_default_config(), "outdir": str(tmp_path), **change}
    with pytest.raises(ValueError, match=message):
        ptif.calc_img_wise(config, mlp(), loader(x, y), loader(xt, yt))


def test_device_and_divergence_errors(tmp_path):
    x, y, xt, yt = digits(n_train=40, n_test=20)
    model = mlp()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"config\['gpu'\] is 0, but CUDA is not available"):
            ptif.calc_img_wise({**ptif.get_default_config(), "gpu": 0}, model, loader(x, y), loader(xt, yt))
    with pytest.warns(UserWarning, match="unknown keys \\['recursion_dept'\\]"), \
            pytest.raises(ValueError, match="LiSSA diverged.*scale=0.001.*increase"):
        config = {**ptif.get_default_config(), "outdir": str(tmp_path), "recursion_dept": 10, "scale": 1e-3,
                  "recursion_depth": 200}
        ptif.calc_img_wise(config, train(model, x, y, steps=30), loader(x, y), loader(xt, yt))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu(tmp_path):
    x, y, xt, yt = digits(n_train=100, n_test=30)
    model = train(mlp(), x, y, steps=100)
    config = {**ptif.get_default_config(), "outdir": str(tmp_path), "solver": "direct", "damp": 0.05}
    on_cpu, harmful, _ = ptif.calc_img_wise(config, model, loader(x, y), loader(xt, yt))
    on_gpu, harmful_gpu, _ = ptif.calc_img_wise({**config, "gpu": 0}, model.cuda(), loader(x, y), loader(xt, yt))
    for key in on_cpu:
        assert np.allclose(on_gpu[key]["influence"], on_cpu[key]["influence"], rtol=1e-8, atol=1e-14)
    assert harmful_gpu[:10] == harmful[:10]
