"""Object masks from a transformers Mask2Former (the paper: GenEval's Mask2Former on COCO).

As the authors' evaluation does, the object's mask is the one predicted instance of the object's class with
the highest score (no score threshold by default); an image with no instance of the class has no mask.
A label names the object when it equals the object's name (COCO's, e.g. ``teddy bear``), ignoring a panoptic
suffix (``wall-other-merged`` names ``wall``). Runs in the job process on its own device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from explab.errors import ModelError


def names_object(label: str, obj: str) -> bool:
    """Whether a segmentation label names the object (case-insensitive)."""
    return label.lower().split("-")[0].strip() == " ".join(obj.lower().split())


class Segmenter:
    """A transformers universal segmentation model and its image processor, loaded by name or path."""

    def __init__(self, name: str, device: str = "auto", threshold: float = 0.0):
        import torch
        from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.threshold = threshold
        try:
            self.processor = AutoImageProcessor.from_pretrained(name)
            self.model = AutoModelForUniversalSegmentation.from_pretrained(name).to(self.device).eval()
        except Exception as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(f"could not load the segmentation model {name!r} ({reason}): give a transformers "
                             "universal segmentation model (e.g. facebook/mask2former-swin-small-coco-instance) "
                             "or set evaluation.segmenter: null") from None
        self.labels: dict[int, str] = {int(k): v.lower() for k, v in self.model.config.id2label.items()}

    def predict(self, image: np.ndarray) -> Any:
        """The model's raw outputs (class and mask logits per query) for a uint8 (H, W, 3) image."""
        import torch

        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            return self.model(**inputs)

    def select(self, outputs: Any, obj: str, size: tuple[int, int]) -> np.ndarray | None:
        """(H, W) boolean mask of the best-scoring instance labelled ``obj``, or None when there is none."""
        result: dict[str, Any] = self.processor.post_process_instance_segmentation(
            outputs, threshold=self.threshold, target_sizes=[size], return_binary_maps=True)[0]
        scored = [(s["score"], i) for i, s in enumerate(result["segments_info"])
                  if names_object(self.labels.get(s["label_id"], ""), obj)]
        if not scored:
            return None
        best = max(scored, key=lambda pair: (pair[0], -pair[1]))[1]  # the first of equal scores
        return result["segmentation"][best].cpu().numpy() > 0

    def mask(self, image: np.ndarray, obj: str) -> np.ndarray | None:
        """(H, W) boolean mask of ``obj`` in a uint8 (H, W, 3) image, or None where no instance is labelled so."""
        return self.select(self.predict(image), obj, image.shape[:2])
