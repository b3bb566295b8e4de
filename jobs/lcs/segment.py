"""Object masks from a transformers panoptic segmentation model (the paper: Mask2Former on COCO).

The object's mask is the union of the predicted segments whose label names the object (its word, or
the last word of a multi-word object). Runs in the job process on its own device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from explab.errors import ModelError


class Segmenter:
    def __init__(self, name: str, device: str = "auto"):
        import torch
        from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        try:
            self.processor = AutoImageProcessor.from_pretrained(name)
            self.model = AutoModelForUniversalSegmentation.from_pretrained(name).to(self.device).eval()
        except Exception as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelError(f"could not load the segmentation model {name!r} ({reason}): give a transformers "
                             "universal segmentation model (e.g. facebook/mask2former-swin-large-coco-panoptic) "
                             "or set evaluation.segmenter: null") from None
        self.labels: dict[int, str] = {int(k): v.lower() for k, v in self.model.config.id2label.items()}

    def mask(self, image: np.ndarray, obj: str) -> np.ndarray | None:
        """(H, W) boolean mask of ``obj`` in a uint8 (H, W, 3) image, or None where no segment is labelled so."""
        import torch

        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        result: dict[str, Any] = self.processor.post_process_panoptic_segmentation(
            outputs, target_sizes=[image.shape[:2]])[0]
        names = {obj.lower(), obj.lower().split()[-1]}
        ids = [s["id"] for s in result["segments_info"] if self.labels.get(s["label_id"], "").split("-")[0] in names]
        if not ids:
            return None
        seg = result["segmentation"].cpu().numpy()
        return np.isin(seg, ids)
