//! Bounce classification in the relay: the process-wide [`Classifier`]
//! (shipped rules, plus `delivery.bounce_rules` when set), swapped whole on
//! reload, and [`classify`] for any recorded reply. The rules and their
//! matching are in `sluice_policy::bounce` (sans-IO, unit-tested); this module
//! only loads the file and holds the result.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use sluice_policy::bounce::{BounceClass, Classifier, Enhanced, ReplyParts, MAX_RULES_FILE};
use sluice_spool::Reply;

static CLASSIFIER: OnceLock<ArcSwap<Classifier>> = OnceLock::new();

fn cell() -> &'static ArcSwap<Classifier> {
    CLASSIFIER.get_or_init(|| ArcSwap::from_pointee(Classifier::default()))
}

/// Reads and compiles the rules: the file's (before the shipped ones) when
/// `path` is set, else the shipped rules. Errors name the file, the rule, the
/// key and its line.
pub fn load(path: Option<&Path>) -> Result<Classifier, String> {
    let Some(path) = path else {
        return Ok(Classifier::default());
    };
    let origin = format!("delivery.bounce_rules {}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| format!("{origin}: {e}"))?;
    if meta.len() > MAX_RULES_FILE as u64 {
        return Err(format!("{origin}: larger than {MAX_RULES_FILE} bytes"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{origin}: {e}"))?;
    Classifier::load(&origin, &text).map_err(|e| e.to_string())
}

/// Makes `classifier` the one every later [`classify`] uses.
pub fn install(classifier: Classifier) {
    let (total, from_file) = classifier.counts();
    tracing::debug!(
        rules = total,
        from_file,
        "bounce classification rules loaded"
    );
    cell().store(Arc::new(classifier));
}

/// The class of a failure or deferral reply.
pub fn classify(reply: &Reply) -> BounceClass {
    cell().load().classify(&ReplyParts {
        code: reply.code,
        enhanced: reply.status.map(|s| Enhanced {
            class: s.class,
            subject: s.subject,
            detail: s.detail,
        }),
        text: &reply.text,
    })
}

/// The class of a reply line as a DSN or the queue view shows it
/// ("550 5.1.1 text").
pub fn classify_line(line: &str) -> BounceClass {
    classify(&Reply::parse(line))
}
