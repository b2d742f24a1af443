"""What each distillation step trains on: the recipe (`distill` runs it; `calibrate` settles its span)."""

from __future__ import annotations

from dataclasses import dataclass

from aa_deploy.common.errors import SettingError


@dataclass(frozen=True)
class Recipe:
    """What each distillation step trains on (the defaults are the shipped recipe)."""

    shift: int = 4  # pad-and-crop shifts of +-shift px (circular rolls too, with `circular`)
    mix: bool = True  # blend pairs of images first
    teacher_views: int = 4  # teacher averaged over this many shifts of each blend; 0: the student's own view
    # shifted views of each blend the student trains on, all to one target; None: 2, or 1 crop of a canvas
    # (cached targets make the student the whole cost of a step: one view is twice the epochs in the same time)
    student_views: int | None = None
    temperature: float = 2.0
    invariance: float = 0.0  # weight of a term pulling the student's views towards their own mean answer
    circular: bool = True  # every second student view is a circular roll (+-shift px) instead of a pad-and-crop
    average_epochs: float = 0.0  # >0: scored and kept are the weights' exponential average over about this many epochs
    # >0: the images are canvases `span` px larger than the model's input (the resize before the centre crop),
    # and every view is a crop of one at offsets 0..span, mirrored at random: the shifts a user's images
    # undergo, with real content at every border. The target, the teacher's answer averaged over
    # `teacher_views` such crops and their mirror images, is computed once per image and reused every epoch
    # (so no mixup).
    span: int = 0

    def __post_init__(self) -> None:
        if self.shift < 1:
            raise SettingError("shift", "must be 1 pixel or more", self.shift)
        for name in ("teacher_views", "invariance", "average_epochs", "span"):
            if getattr(self, name) < 0:
                raise SettingError(name, "must be 0 or more", getattr(self, name))
        if self.student_views is not None and self.student_views < 1:
            raise SettingError("student_views", "must be 1 or more", self.student_views)
