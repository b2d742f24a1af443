"""The graph pass: find the downsampling sites of an ONNX graph (`sites`), plan what each gets (`plan`,
`filters`), rewrite it with fixed blurs (`rewrite`, `blur_nodes`) or dense sampling (`dense`, `dense_nodes`,
`phases`), and count what that costs (`cost`) and did (`report`). `graph_pass` runs them in order."""
