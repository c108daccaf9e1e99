"""The Open Inference Protocol (KServe v2 gRPC), the bottom of everything that touches traffic.

``oip_pb2``  the generated messages (proto/oip.proto, package sidewatch.oip)
``paths``    the method paths, unary and streaming
``peek``     the model name and version at the front of a serialized request, without parsing it
``codec``    tensors <-> numpy, every datatype, raw and typed contents
``client``   a small inference client (the demo, tests and benchmarks use it)
"""
