"""Small ONNX models built with the onnx helper API for end-to-end tests."""
