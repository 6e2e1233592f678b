//! Stream flow control (placeholder; being written).
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowError {
    Placeholder,
}
impl FlowError {
    pub fn reason(&self) -> &'static str {
        "placeholder"
    }
}
impl fmt::Display for FlowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "placeholder")
    }
}
