//! [`CallbackParams`]: what the provider sent back to the redirect URI.

use std::fmt;

/// The parameters of an authorization callback (RFC 6749 §4.1.2): `code` and `state`, or
/// `error`, `error_description` and `state`.
///
/// Made from the callback's query string (`From<&str>`, with or without the leading `?`, or
/// the whole callback URL), or from the fields your web framework already parsed. A parameter
/// given twice makes the callback invalid (it is how some parameter-pollution attacks start).
///
/// `Debug` redacts the code.
///
/// ```
/// use tokenkeeper::CallbackParams;
/// let from_query = CallbackParams::from("code=abc&state=xyz");
/// let from_url = CallbackParams::from("https://app.example.com/callback?code=abc&state=xyz");
/// let by_hand = CallbackParams::new().code("abc").state("xyz");
/// assert_eq!(from_query, from_url);
/// assert_eq!(from_query, by_hand);
/// assert!(!format!("{from_query:?}").contains("abc"));
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CallbackParams {
    pub(super) code: Option<String>,
    pub(super) state: Option<String>,
    pub(super) error: Option<String>,
    pub(super) error_description: Option<String>,
    /// Why the query could not be trusted, if it could not.
    pub(super) problem: Option<&'static str>,
}

impl CallbackParams {
    /// No parameters; add them with the setters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a query string (`code=…&state=…`, with or without the leading `?`) or a whole
    /// callback URL. Unknown parameters are ignored.
    pub fn from_query(query: &str) -> Self {
        let query = match query.split_once('?') {
            Some((_, query)) => query,
            None => query,
        };
        let query = query.split('#').next().unwrap_or_default();
        let mut params = Self::default();
        for (name, value) in oauth2::url::form_urlencoded::parse(query.as_bytes()) {
            let slot = match &*name {
                "code" => {
                    if params.code.is_some() {
                        params.problem = Some("a parameter is repeated");
                    }
                    params.code = Some(value.into_owned());
                    continue;
                }
                "state" => &mut params.state,
                "error" => &mut params.error,
                "error_description" => &mut params.error_description,
                _ => continue,
            };
            if slot.is_some() {
                params.problem = Some("a parameter is repeated");
            }
            *slot = Some(value.into_owned());
        }
        params
    }

    /// The authorization code.
    pub fn code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// The state.
    pub fn state(mut self, state: impl Into<String>) -> Self {
        self.state = Some(state.into());
        self
    }

    /// The `error` code of a refused authorization.
    pub fn error(mut self, error: impl Into<String>) -> Self {
        self.error = Some(error.into());
        self
    }

    /// The `error_description` of a refused authorization.
    pub fn error_description(mut self, description: impl Into<String>) -> Self {
        self.error_description = Some(description.into());
        self
    }
}

impl From<&str> for CallbackParams {
    fn from(query: &str) -> Self {
        Self::from_query(query)
    }
}

impl From<String> for CallbackParams {
    fn from(query: String) -> Self {
        Self::from_query(&query)
    }
}

impl From<&String> for CallbackParams {
    fn from(query: &String) -> Self {
        Self::from_query(query)
    }
}

impl fmt::Debug for CallbackParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallbackParams")
            .field("code", &self.code.as_ref().map(|_| "[redacted]"))
            .field("state", &self.state.as_ref().map(|_| "[redacted]"))
            .field("error", &self.error)
            .field("error_description", &self.error_description)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_queries_urls_and_errors() {
        let p = CallbackParams::from("?state=s%20t&code=c+d&other=1");
        assert_eq!(p.state.as_deref(), Some("s t"));
        assert_eq!(p.code.as_deref(), Some("c d"));
        assert_eq!(p.problem, None);
        let p = CallbackParams::from(
            "https://app/cb?error=access_denied&error_description=No%21&state=s#frag",
        );
        assert_eq!(p.error.as_deref(), Some("access_denied"));
        assert_eq!(p.error_description.as_deref(), Some("No!"));
        assert_eq!(p.state.as_deref(), Some("s"));
    }

    #[test]
    fn repeated_parameters_are_a_problem() {
        assert!(CallbackParams::from("state=a&state=b&code=c")
            .problem
            .is_some());
        assert!(CallbackParams::from("state=a&code=b&code=c")
            .problem
            .is_some());
    }
}
