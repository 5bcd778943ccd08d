"""Other libraries' attribution methods as LDS rows of ``bench_lds.py``.

Each function takes the benchmark's ``Setting`` (the trained model, the data,
the regularization, and the extra models some methods need) and returns
``(n_test, n_train)`` float64 scores with torchfluence's sign: positive means
that the training point lowers the test point's loss. Each library is imported
inside its function, so a missing or broken peer fails its own rows only (the
benchmark reports the error in the table).

Peers and their configurations (the libraries' documented defaults unless said):

- kronfluence 1.0.1: ``FactorArguments()`` (strategy "ekfac": EK-FAC with the
  true Fisher, labels sampled from the model) or ``FactorArguments(strategy="kfac")``;
  ``ScoreArguments(damping_factor=reg)``, the same absolute damping as
  torchfluence's regularization. kronfluence's documented classification task
  (``_resnet9.kronfluence_task``: summed cross-entropy, loss as measurement).
  Scores: (n_test, n_train), positive = helpful, as torchfluence.
- TRAK (``traker`` 0.3.2): ``TRAKer(task="image_classification")`` (the margin
  log p / (1 - p) as model output), ``device="cpu"``, which selects
  ``BasicProjector`` (Rademacher) since the CUDA ``fast_jl`` projector needs a GPU;
  ``use_half_precision=False`` (float16 matmuls on the CPU); ``lambda_reg`` 0
  (the default). The ensemble is the harness's K models trained on the full
  training set with the same recipe, initial weights and shuffling seeded 1..K
  (seed 0 = the model every other row uses). ``finalize_scores`` returns
  (n_train, n_test), positive = helpful; transposed here.
- dattri 0.3.0: ``IFAttributorCG`` (Hessian of the mean training loss,
  ``regularization=reg``, its default ``max_iter=10``), ``TracInAttributor``
  (checkpoints saved along the one training run, weights = the learning rate,
  unnormalized gradients, dattri's default 512-dim random projection) and
  ``TRAKAttributor`` (margin loss and correct-class probability as in dattri's
  examples, its default 512-dim random projection on the CPU, regularization 0
  (its default), the same ensemble as TRAK's). All return (n_train, n_test),
  positive = helpful; transposed here.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


@contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _float32(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).float().eval()


# -- kronfluence -------------------------------------------------------------------------------------


def kronfluence(strategy: str):
    """kronfluence 1.0.1 pairwise scores with ``FactorArguments(strategy=...)`` and our damping."""

    def run(s) -> Tensor:
        from _resnet9 import KronfluenceRun
        from kronfluence.arguments import FactorArguments, ScoreArguments

        torch.manual_seed(0)  # kronfluence samples the Fisher's labels from torch's global generator
        factor_args = FactorArguments() if strategy == "ekfac" else FactorArguments(strategy=strategy)
        with _quiet(), KronfluenceRun(s.model, (s.x, s.y), (s.x_test, s.y_test), cpu=True,
                                      factor_args=factor_args,
                                      score_args=ScoreArguments(damping_factor=s.reg)) as kron:
            kron.fit(s.batch_size)
            scores = kron.scores(len(s.x_test), s.batch_size)
        return scores.double()

    return run


# -- TRAK (traker) -----------------------------------------------------------------------------------


def trak(ensemble: int, proj_dim: int | None = None):
    """traker 0.3.2 on the CPU over `ensemble` independently seeded models; proj_dim None = its default."""

    def run(s) -> Tensor:
        from trak import TRAKer

        models = s.ensemble(ensemble)
        kwargs = {} if proj_dim is None else {"proj_dim": proj_dim}
        n_train, n_test = len(s.y), len(s.y_test)
        with tempfile.TemporaryDirectory() as save_dir, _quiet():
            traker = TRAKer(model=copy.deepcopy(models[0]), task="image_classification",
                            train_set_size=n_train, save_dir=save_dir, device="cpu", use_half_precision=False,
                            logging_level=logging.ERROR, **kwargs)
            for model_id, model in enumerate(models):
                traker.load_checkpoint(model.state_dict(), model_id=model_id)
                for start in range(0, n_train, s.batch_size):
                    batch = (s.x[start:start + s.batch_size], s.y[start:start + s.batch_size])
                    traker.featurize(batch=batch, num_samples=len(batch[1]))
            traker.finalize_features()
            for model_id, model in enumerate(models):
                traker.start_scoring_checkpoint(exp_name="lds", checkpoint=model.state_dict(),
                                                model_id=model_id, num_targets=n_test)
                traker.score(batch=(s.x_test, s.y_test), num_samples=n_test)
            scores = traker.finalize_scores(exp_name="lds")  # (n_train, n_test)
        return torch.as_tensor(scores).double().T.contiguous()

    return run


# -- dattri ------------------------------------------------------------------------------------------


def _loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def dattri_if_cg(max_iter: int = 10):
    """dattri 0.3.0 ``IFAttributorCG``: (H + reg I)^-1 by max_iter CG steps on the mean-loss Hessian."""

    def run(s) -> Tensor:
        from dattri.algorithm.influence_function import IFAttributorCG
        from dattri.task import AttributionTask

        model = s.model

        def loss(params, data):  # data: one sample with a leading batch dimension of 1, or the full batch
            x, y = data
            return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

        task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
        attributor = IFAttributorCG(task=task, device="cpu", regularization=s.reg, max_iter=max_iter)
        n = len(s.y)
        with _quiet():
            attributor.cache(_loader(s.x, s.y, n))  # one batch: the whole training set's Hessian
            with torch.no_grad():
                scores = attributor.attribute(_loader(s.x, s.y, n),
                                              _loader(s.x_test, s.y_test, len(s.y_test)))
        return scores.double().T.contiguous()

    return run


def dattri_tracin():
    """dattri 0.3.0 ``TracInAttributor`` over the checkpoints saved during the one training run."""

    def run(s) -> Tensor:
        from dattri.algorithm.tracin import TracInAttributor
        from dattri.task import AttributionTask

        checkpoints, lrs = s.trajectory()
        model = copy.deepcopy(s.model)

        def loss(params, data):  # one sample, no batch dimension
            x, y = data
            logits = torch.func.functional_call(model, params, (x.unsqueeze(0),))
            return F.cross_entropy(logits, y.unsqueeze(0))

        task = AttributionTask(loss_func=loss, model=model, checkpoints=checkpoints)
        attributor = TracInAttributor(task=task, weight_list=torch.tensor(lrs), normalized_grad=False,
                                      projector_kwargs={"proj_dim": 512, "proj_max_batch_size": 32,
                                                        "proj_seed": 0, "device": "cpu"},
                                      device="cpu")
        with _quiet(), torch.no_grad():
            scores = attributor.attribute(_loader(s.x, s.y, s.batch_size),
                                          _loader(s.x_test, s.y_test, len(s.y_test)))
        return scores.double().T.contiguous()

    return run


def dattri_trak(ensemble: int, proj_dim: int = 512):
    """dattri 0.3.0 ``TRAKAttributor`` (its examples' margin and probability functions) over the ensemble."""

    def run(s) -> Tensor:
        from dattri.algorithm.trak import TRAKAttributor
        from dattri.task import AttributionTask

        models = s.ensemble(ensemble)
        model = copy.deepcopy(models[0])

        def margin(params, data):  # one sample: log p - log(1 - p), TRAK's model output
            x, y = data
            logits = torch.func.functional_call(model, params, (x.unsqueeze(0),))
            logp = -F.cross_entropy(logits, y.unsqueeze(0))
            return logp - torch.log(1 - torch.exp(logp))

        def correct_probability(params, data):
            x, y = data
            return torch.exp(-F.cross_entropy(torch.func.functional_call(model, params, (x.unsqueeze(0),)),
                                              y.unsqueeze(0)))

        task = AttributionTask(loss_func=margin, model=model, checkpoints=[m.state_dict() for m in models])
        # A fresh dict: dattri updates its module-level default projector arguments in place.
        projector = {"proj_dim": proj_dim, "proj_max_batch_size": 32, "proj_seed": 0, "device": "cpu"}
        attributor = TRAKAttributor(task=task, correct_probability_func=correct_probability, device="cpu",
                                    projector_kwargs=projector)
        with _quiet(), torch.no_grad():
            attributor.cache(_loader(s.x, s.y, s.batch_size))
            scores = attributor.attribute(_loader(s.x_test, s.y_test, len(s.y_test)))
        return scores.double().T.contiguous()

    return run
