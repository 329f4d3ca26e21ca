"""Demo material: synthetic chest X-ray phantoms and the demo triage model trained on them.

Everything here is labelled DEMO; none of it is a real patient or a clinically validated model.
Training lives in ``worker.demo.train`` (it imports torch; the phantoms do not).
"""

from worker.demo.phantoms import KINDS, make_cxr_dataset, make_cxr_pixels, write_synthetic_study

__all__ = ["KINDS", "make_cxr_dataset", "make_cxr_pixels", "write_synthetic_study"]
