use pyo3::prelude::*;

#[pyclass(module = "nerve._core")]
pub struct CreditSender {}

#[pyclass(module = "nerve._core")]
pub struct StreamReceiver {}
