"""The training progress display."""

import sys


class Progress:
    """A rich progress bar with the latest loss, tokens/s and MFU; plain log lines when not a TTY."""

    def __init__(self, total: int, start: int, enabled: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            disable=not (enabled and sys.stdout.isatty()),
        )
        self.task = self.bar.add_task("train", total=total, completed=start, info="")
        self.enabled = enabled
        self.mixture: dict[str, float] = {}  # documents drawn from each source of a mixture so far
        self.bar.start()

    def update(self, step: int, record: dict, log: bool) -> None:
        info = f"loss {record['loss']:.3f}  {record['tokens_per_s']:,.0f} tok/s  MFU {record['mfu']:.1%}"
        if "reward" in record:  # an objective that samples (GRPO)
            info += f"  reward {record['reward']:.3f}"
        for name in ("eval_loss", "eval_reward"):
            if name in record:
                info += f"  {name.replace('_', ' ')} {record[name]:.3f}"
        for key, value in record.items():
            if key.startswith("mixture/"):
                self.mixture[key.removeprefix("mixture/")] = self.mixture.get(key.removeprefix("mixture/"), 0) + value
        if total := sum(self.mixture.values()):  # the realised shares of a mixture, this run so far
            info += "  mix " + " ".join(f"{name} {count / total:.0%}" for name, count in self.mixture.items())
        self.bar.update(self.task, completed=step, info=info)
        if log and self.enabled:  # above the bar on a terminal, a plain line in a log file
            # soft_wrap: one line, however long (a log file has no width: rich would wrap at 80)
            self.bar.console.print(f"step {step:>6}  {info}  lr {record['lr']:.2e}", highlight=False, soft_wrap=True)

    def close(self) -> None:
        self.bar.stop()
