"""The feedback store: analysed images and the labels clinicians confirmed or corrected.

Used by the web app (which records analyses and feedback) and by retraining (which reads the
confirmed labels); neither reaches into the other. SQLAlchemy is imported on first use (extra `serve`).
"""

from .store import Confirmed, FeedbackStore, ModelVersion, UnknownAnalysis

__all__ = ["Confirmed", "FeedbackStore", "ModelVersion", "UnknownAnalysis"]
