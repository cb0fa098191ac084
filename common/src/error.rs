use std::fmt;

/// A value that failed validation. It always names the field and the offending value so that
/// API clients and CLI users can see exactly what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ParseError {
    pub field: String,
    pub value: String,
    pub reason: String,
}

impl ParseError {
    pub fn new(
        field: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        let mut value = value.into();
        // Never echo megabytes of hostile input back into logs or responses.
        if value.len() > 96 {
            let mut cut = 96;
            while !value.is_char_boundary(cut) {
                cut -= 1;
            }
            value.truncate(cut);
            value.push('…');
        }
        Self { field: field.into(), value, reason: reason.into() }
    }

    /// Re-labels the error with the path of the field it was found in (e.g. `macs[1]`).
    pub fn in_field(mut self, field: impl Into<String>) -> Self {
        self.field = field.into();
        self
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {} {:?}: {}", self.field, self.value, self.reason)
    }
}
