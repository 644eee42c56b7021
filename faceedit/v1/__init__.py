"""Generated gRPC/protobuf modules of the `faceedit.v1` API (built from protos/ by `python -m faceedit.protos`)."""
