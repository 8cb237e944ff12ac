"""A trained model put to use: loaded from a jaxlm run or a Hugging Face directory (`loading`),
generating with its KV cache (`generation`, `text_stream`), exported to the Hugging Face and
PEFT formats (`export`)."""
