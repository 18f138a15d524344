"""The thin runtime: preprocessing → vision engine → splice → LLM engine, with streaming."""
