"""The web app and REST API (`retinalens serve BUNDLE`; extra `serve`). The feedback store it writes
is `retinalens.feedback`. Nothing here is imported by the rest of the package: fastapi and uvicorn stay
optional."""
