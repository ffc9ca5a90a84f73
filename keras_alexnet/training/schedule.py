"""The paper's learning-rate schedule (Sec. 5): divide by 10 when validation error stops
improving, at most three times."""


class PlateauSchedule:
    """Divides the learning rate by ``1 / factor`` when validation top-1 stops improving.

    After ``patience`` epochs without a new best, at most ``max_drops`` times. Its state
    (best, wait, drops) is committed with each checkpoint (`RunState.schedule`), so a
    resumed run continues it; the learning rate itself is an optimiser variable and
    lives in the checkpoint.
    """

    def __init__(self, max_drops, patience, factor=0.1, monitor="val_top1"):
        self.max_drops, self.patience, self.factor, self.monitor = (
            max_drops, patience, factor, monitor)
        self.best, self.wait, self.drops = -1.0, 0, 0

    def get_state(self):
        return {"best": self.best, "wait": self.wait, "drops": self.drops}

    def set_state(self, state):
        self.best, self.wait, self.drops = state["best"], state["wait"], state["drops"]

    def update(self, value, lr):
        """Takes an epoch's monitored ``value`` and the learning rate ``lr`` it trained
        with; returns the learning rate for the next epoch."""
        if value > self.best:
            self.best, self.wait = value, 0
            return lr
        self.wait += 1
        if self.wait >= self.patience and self.drops < self.max_drops:
            self.drops += 1
            self.wait = 0
            return lr * self.factor
        return lr
