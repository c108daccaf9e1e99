"""The Open Inference Protocol (KServe v2 gRPC): generated messages, method paths, tensor codec."""
