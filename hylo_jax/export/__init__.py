"""Export to Hugging Face / PyTorch: `writer` writes model folders; `configuration_hylo` and
`modeling_hylo` are the standalone PyTorch implementation copied into a hybrid's folder."""
