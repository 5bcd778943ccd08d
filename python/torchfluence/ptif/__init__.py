"""A drop-in backend for pytorch-influence-functions: ``import torchfluence.ptif as ptif``.

Scripts written for pytorch-influence-functions (0.1.x) run unchanged after the
import swap::

    import torchfluence.ptif as ptif

    ptif.init_logging()
    config = ptif.get_default_config()
    influences, harmful, helpful = ptif.calc_img_wise(config, model, train_loader, test_loader)

Same config keys, return values and JSON files; the computation is batched:
the selected test samples are solved together and every training gradient is
computed once, in batches, and scored with the influence-assembly kernel.

What the numbers mean (fixed here, where the original was ambiguous or wrong):

* ``influence[j] = -(1/n) grad L(z_test)^T (H + damp I)^-1 grad L(z_j)``, with H the
  Hessian of the mean training loss (cross-entropy, as in the original) and n the
  training set size: Koh & Liang's I_up,loss divided by n. Adding a copy of z_j
  changes the test loss by about ``influence[j]``; removing z_j by about
  ``-influence[j]``. If the model was trained with L2 weight decay ``wd`` (loss +
  wd/2 |theta|^2), set ``damp`` to at least ``wd``.
* ``harmful`` lists the training samples whose up-weighting raises the test loss
  the most (largest influence first); ``helpful`` is its reverse. (The original
  sorts the other way round.)
* ``damp`` and ``scale`` are used. The LiSSA recursion (``solver="lissa"``, the
  default) is ``h <- v + h - (H_batch + damp I) h / scale`` over the training
  loader's minibatches, with nothing but h carried between steps, returning
  h / scale; it converges to (H + damp I)^-1 v when ``scale`` exceeds the largest
  eigenvalue of H + damp I and otherwise stops with an error saying so. ``r``
  (``r_averaging``) independent recursions are averaged. ``solver`` may also be
  ``"cg"``, ``"direct"`` (exact), ``"arnoldi"``, ``"nystroem"``, ``"kfac"`` or ``"ekfac"``.
* Test samples: with ``test_sample_num`` set, for every class ``test_sample_num``
  samples after skipping ``test_start_index`` of that class; otherwise every test
  sample from ``test_start_index`` on.
* ``gpu`` selects the device (-1: CPU); the model must already be there.
* ``time_calc_influence_s`` is each test sample's share of the batched wall time.
* The model is put in ``eval()`` mode, as the original does.
"""

from .api import calc_all_grad_then_test, calc_img_wise
from .config import get_default_config
from .files import display_progress, init_logging
from .lowlevel import calc_grad_z, calc_influence_single, calc_s_test, calc_s_test_single, grad_z, s_test

__all__ = [
    "calc_all_grad_then_test",
    "calc_grad_z",
    "calc_img_wise",
    "calc_influence_single",
    "calc_s_test",
    "calc_s_test_single",
    "display_progress",
    "get_default_config",
    "grad_z",
    "init_logging",
    "s_test",
]
