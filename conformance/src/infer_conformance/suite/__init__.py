"""The conformance test modules (collected by ``pytest --pyargs infer_conformance``)."""
