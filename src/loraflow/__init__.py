"""loraflow: fine-tune LoRA adapters with LLaMA-Factory on Ray Train, track and register them in
MLflow, evaluate with Ray Data LLM + vLLM, promote through the registry and serve with Ray Serve LLM."""

__version__ = "0.1.0"
