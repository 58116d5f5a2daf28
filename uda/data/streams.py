"""The data of a run: the training streams (source always; the target when an objective trains on it, with the
frames and labels the objectives ask for) and the validation splits."""

from __future__ import annotations

from collections.abc import Sequence

from uda.config import DataConfig, ExperimentConfig
from uda.data.loader import MixedBatches, train_loader
from uda.data.readers import build_dataset
from uda.data.transforms import EvalTransform, TrainTransform


class RunData:
    """Datasets and streams of a run; `needs[d]` lists what each objective using domain d needs of its stream
    (objects with `frames`, `unlabelled` and `sampling`, see uda.objectives.StreamNeeds)."""

    def __init__(self, cfg: ExperimentConfig, needs: Sequence[Sequence]) -> None:
        self.cfg = cfg
        self.needs = needs
        # train.bn_mode=domain reads target images for their BatchNorm statistics even when no objective trains
        # on them (AdaBN); not for the oracle, whose data is the target.
        target = cfg.target
        self.target_statistics = (
            cfg.train.bn_mode == "domain" and target is not None and target.dataset != cfg.data.dataset
        )

    def uses_domain(self, domain: int) -> bool:
        """Whether a training stream of `domain` is loaded (the source always is)."""
        return domain == 0 or bool(self.needs[domain]) or (domain == 1 and self.target_statistics)

    def spread_images(self, data: DataConfig, count: int):
        """A loader over `count` images of data's training split spread evenly over it (evaluation transform, no
        labels; the same images on every process)."""
        import torch

        from uda.data.loader import eval_loader

        dataset = self.dataset(data, data.train_split, (), train=False, domain=1)
        count = min(count, len(dataset))
        picked = [i * len(dataset) // count for i in range(count)]
        return eval_loader(torch.utils.data.Subset(dataset, picked), data.batch_size, 0, 1, data.num_workers)

    def label_tasks(self, domain: int) -> tuple[str, ...]:
        """The labels a training stream loads: none on the target; not those an objective learns otherwise."""
        if domain == 1:
            return ()
        unlabelled = set().union(*(n.unlabelled for n in self.needs[domain]))
        return tuple(t for t in self.cfg.tasks if t not in unlabelled)

    def frames(self, domain: int) -> tuple[int, ...]:
        """Neighbouring video frames the objectives need from a domain's training stream."""
        return tuple(sorted(set().union(*(n.frames for n in self.needs[domain]))))

    def dataset(
        self,
        data: DataConfig,
        split: str,
        tasks: tuple[str, ...],
        train: bool,
        domain: int,
        labels_native: bool | None = None,
    ):
        """A reader for one split with the train or evaluation transform of `data` (evaluation: labels at the
        working size, or at their native resolution when labels_native / eval.label_resolution)."""
        if train:
            transform = TrainTransform(
                data.size,
                data.scale_range,
                data.hflip,
                data.color_jitter,
                resize_to=data.resize_to,
                scale_choices=data.scale_choices,
                fit=data.fit,
                crop=data.crop,
            )
        else:
            native = self.cfg.eval.label_resolution if labels_native is None else labels_native
            transform = EvalTransform(
                data.size, keep_label_resolution=native, resize_to=data.resize_to, fit=data.fit
            )
        return build_dataset(
            data.dataset,
            split,
            tasks,
            label_set=data.label_set,
            root=data.root,
            transform=transform,
            frames=self.frames(domain) if train else (),
            domain=domain,
            variation=data.variation,
            sky_depth=data.sky_depth,
        )

    def batches(self, start_step: int, process_index: int = 0, num_processes: int = 1) -> MixedBatches:
        """The endless mixed stream of one process, positioned at start_step."""
        cfg = self.cfg
        streams = []
        for domain, data in enumerate((cfg.data, cfg.target)):
            if not self.uses_domain(domain):
                streams.append(None)
                continue
            dataset = self.dataset(
                data, data.train_split, self.label_tasks(domain), train=True, domain=domain
            )
            seed = cfg.train.seed + domain
            # An objective may choose how the stream draws its samples (e.g. rare-class sampling).
            sampling = next((n.sampling for n in self.needs[domain] if getattr(n, "sampling", None)), None)
            draw = sampling(dataset, seed) if sampling is not None else None
            streams.append(
                train_loader(
                    dataset,
                    data.batch_size,
                    seed,
                    process_index,
                    num_processes,
                    start_step,
                    data.num_workers,
                    draw,
                )
            )
        return MixedBatches(*streams)

    def validation_sets(self) -> list[tuple[str, DataConfig, int]]:
        """(name, data, domain) of each evaluated split: the target's (or the data's) and, in UDA, the source's."""
        cfg = self.cfg
        if cfg.target is None:
            return [("val", cfg.data, 0)]
        sets = [("target", cfg.target, 1)]
        if cfg.target.dataset != cfg.data.dataset:
            sets.append(("source", cfg.data, 0))
        return sets
