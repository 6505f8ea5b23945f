"""Temperature annealing of the attention softmax (DYConv's recipe: 30 -> 1 over the first 10 epochs)."""
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmpretrain.registry import HOOKS


@HOOKS.register_module()
class TemperatureAnnealHook(Hook):
    """Anneal the temperature linearly from ``start`` to ``end`` over the first ``epochs`` epochs, then hold ``end``.

    Before every training iteration it calls ``set_temperature(t)`` on every module that has that method
    (``DYConv2d``, softmax-gated ``MDConv2d``), which writes the layers' ``attention.temperature`` buffer: the
    value reached is saved with the weights, so a checkpoint is evaluated (mmpretrain's ``init_model``, the
    Inferencer, ``tools/test.py``) at the temperature it was trained with. The temperature is a function of the
    iteration only, so a resumed run continues the schedule where it stopped.

    ``custom_hooks = [dict(type='TemperatureAnnealHook', start=30, end=1, epochs=10)]``
    """

    priority = 'NORMAL'

    def __init__(self, start=30.0, end=1.0, epochs=10):
        if epochs <= 0:
            raise ValueError(f'TemperatureAnnealHook: epochs must be positive, got {epochs}')
        self.start = float(start)
        self.end = float(end)
        self.epochs = epochs

    def temperature(self, epoch_progress):
        """Temperature after ``epoch_progress`` (fractional) epochs of training."""
        ratio = min(max(epoch_progress / self.epochs, 0.0), 1.0)
        return self.start + (self.end - self.start) * ratio

    @staticmethod
    def set_temperature(model, t):
        """Call ``set_temperature(t)`` on every module of ``model`` that has it; returns how many."""
        if is_model_wrapper(model):
            model = model.module
        modules = [m for m in model.modules() if callable(getattr(m, 'set_temperature', None))]
        for m in modules:
            m.set_temperature(t)
        return len(modules)

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        iters_per_epoch = len(runner.train_dataloader)
        t = self.temperature(runner.iter / iters_per_epoch)
        self.set_temperature(runner.model, t)
        runner.message_hub.update_scalar('train/temperature', t)
