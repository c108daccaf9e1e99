"""The bundled Open Inference Protocol model server (ONNX Runtime), for the demo and the tests.

``server``      the gRPC servicer and ``sidewatch model-server``
``repository``  the models of a ``DIR/<model>/<version>/model.onnx`` repository, loaded into ONNX Runtime
"""
