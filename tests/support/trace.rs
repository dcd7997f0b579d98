//! A tracing subscriber that keeps everything traced, for the tests that look for secrets in
//! it: every span's name and every field recorded on it (at creation and afterwards), and every
//! event's fields (the message among them), at every level. Error fields are kept with the
//! `Display` and `Debug` of each error in their source chain.
//!
//! Nothing is filtered or formatted away, so a secret in any field is found, whatever a log
//! formatter would have printed. Ids are never reused: a span's fields stay with it after it
//! closes.

use std::cell::RefCell;
use std::fmt;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_core::span::Current;

/// What was traced, in order.
#[derive(Debug, Default)]
pub struct Log {
    /// Every span ever created, in creation order (its id is its index + 1).
    pub spans: Vec<SpanLog>,
    /// Every event.
    pub events: Vec<EventLog>,
}

/// A span: its name and target, and `name=value` of each field recorded on it, in order.
#[derive(Debug)]
pub struct SpanLog {
    pub name: &'static str,
    pub target: &'static str,
    pub fields: Vec<String>,
    metadata: &'static Metadata<'static>,
}

/// An event: its level and target, and `name=value` of each of its fields (`message=…`).
#[derive(Debug)]
pub struct EventLog {
    pub level: tracing::Level,
    pub target: &'static str,
    pub fields: Vec<String>,
}

/// The subscriber; clones share the log.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Log>>);

impl Capture {
    /// Installs a new capture as the global default subscriber (spawned tasks on any thread
    /// are seen). Panics if a global subscriber is already set: one per test binary.
    pub fn install_global() -> Self {
        let capture = Self::default();
        tracing::subscriber::set_global_default(capture.clone())
            .expect("no other global tracing subscriber in this test binary");
        capture
    }

    /// The log so far.
    pub fn log(&self) -> MutexGuard<'_, Log> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Everything as text, one line per span (`name{field=value …}`) and per event
    /// (`LEVEL target: field=value …`): every recorded value appears in it.
    pub fn text(&self) -> String {
        let log = self.log();
        let spans = log
            .spans
            .iter()
            .map(|s| format!("{}{{{}}}", s.name, s.fields.join(" ")));
        let events = log
            .events
            .iter()
            .map(|e| format!("{} {}: {}", e.level, e.target, e.fields.join(" ")));
        spans.chain(events).collect::<Vec<_>>().join("\n")
    }
}

/// Records each field as `name=value`.
struct Fields<'a>(&'a mut Vec<String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push(format!("{}={value}", field.name()));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut next = Some(value);
        while let Some(error) = next {
            self.0.push(format!("{}={error} ({error:?})", field.name()));
            next = error.source();
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.push(format!("{}={value:?}", field.name()));
    }
}

impl Subscriber for Capture {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::always()
    }

    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::TRACE)
    }

    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let mut fields = Vec::new();
        attrs.record(&mut Fields(&mut fields));
        let mut log = self.log();
        log.spans.push(SpanLog {
            name: attrs.metadata().name(),
            target: attrs.metadata().target(),
            fields,
            metadata: attrs.metadata(),
        });
        let id = NonZeroU64::new(log.spans.len() as u64).expect("at least one span");
        Id::from_non_zero_u64(id)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut log = self.log();
        let at = span.into_u64() as usize - 1;
        if let Some(span) = log.spans.get_mut(at) {
            values.record(&mut Fields(&mut span.fields));
        }
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut fields = Vec::new();
        event.record(&mut Fields(&mut fields));
        self.log().events.push(EventLog {
            level: *event.metadata().level(),
            target: event.metadata().target(),
            fields,
        });
    }

    fn enter(&self, span: &Id) {
        ENTERED.with(|entered| entered.borrow_mut().push(span.clone()));
    }

    fn exit(&self, span: &Id) {
        ENTERED.with(|entered| {
            let mut entered = entered.borrow_mut();
            if let Some(at) = entered.iter().rposition(|id| id == span) {
                entered.remove(at);
            }
        });
    }

    /// The innermost span entered on this thread: `Span::current()` (the library records
    /// fields on it).
    fn current_span(&self) -> Current {
        let Some(id) = ENTERED.with(|entered| entered.borrow().last().cloned()) else {
            return Current::none();
        };
        match self.log().spans.get(id.into_u64() as usize - 1) {
            Some(span) => Current::new(id, span.metadata),
            None => Current::none(),
        }
    }
}

thread_local! {
    /// The spans entered on this thread, innermost last.
    static ENTERED: RefCell<Vec<Id>> = const { RefCell::new(Vec::new()) };
}
