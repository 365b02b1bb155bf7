"""Shared instrumentation for the trainer tests."""

from typing import Dict, List, Tuple

from training import common


def record_learning_rates(monkeypatch) -> Tuple[Dict[int, float], List[float]]:
    """Return ``(logged, used)``, filled while a trainer runs.

    ``logged``: the ``train/lr`` scalar by step; ``used``: the lr of every optimizer step
    taken, read when its backward pass runs.
    """
    logged: Dict[int, float] = {}
    used: List[float] = []
    log, backward = common.ScalarLogger.log, common.GradientStepper.backward

    def record_log(self, scalars, step, prefix=''):
        if prefix == 'train':
            logged[step] = scalars['lr']
        return log(self, scalars, step, prefix)

    def record_backward(self, loss):
        lr = self.optimizer.param_groups[0]['lr']
        stepped = backward(self, loss)
        if stepped:
            used.append(lr)
        return stepped

    monkeypatch.setattr(common.ScalarLogger, 'log', record_log)
    monkeypatch.setattr(common.GradientStepper, 'backward', record_backward)
    return logged, used
