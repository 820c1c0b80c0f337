"""The web app, REST API and feedback store (`retinalens serve BUNDLE`; extra `serve`).

    from retinalens.serve.feedback import FeedbackStore
    store = FeedbackStore("sqlite:///feedback/feedback.db")      # images beside it, in feedback/images/
    for image, label, record in store.confirmed():                # clinician-confirmed labels, for retraining
        ...

Nothing here is imported by the rest of the package: fastapi, uvicorn and SQLAlchemy stay optional.
"""
