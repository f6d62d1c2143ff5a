//! Applying the DATA stage's modifications to the spool envelope and the
//! message before they are stored.

use sluice_policy::stage::Modification;
use sluice_policy::stage_message::{self, ApplyError, EditableEnvelope};
use sluice_policy::{RelayDecision, RelayPolicy};
use sluice_spool::{Envelope, Recipient, RecipientStatus};

/// Applies `mods` to `envelope` and `body` (the message as it will be
/// stored). Recipients a filter adds are local when the relay says so;
/// recipients it keeps keep their DSN parameters. The envelope size follows
/// the message.
pub fn apply(
    mods: &[Modification],
    envelope: &mut Envelope,
    body: Vec<u8>,
    relay: &RelayPolicy,
) -> Result<Vec<u8>, ApplyError> {
    if mods.is_empty() {
        return Ok(body);
    }
    let mut edit = EditableEnvelope {
        sender: envelope.sender.clone(),
        recipients: envelope
            .recipients
            .iter()
            .map(|r| r.address.clone())
            .collect(),
    };
    let before = body.len() as u64;
    let body = stage_message::apply(mods, &mut edit, body)?;
    envelope.size = (envelope.size + body.len() as u64).saturating_sub(before);
    envelope.sender = edit.sender;
    let mut old = std::mem::take(&mut envelope.recipients);
    for address in edit.recipients {
        let kept = old
            .iter()
            .position(|r| r.address.eq_ignore_ascii_case(&address))
            .map(|i| old.swap_remove(i));
        let recipient = kept.unwrap_or_else(|| Recipient {
            local: matches!(
                relay.check_recipient(&address, std::net::Ipv4Addr::LOCALHOST.into(), true),
                RelayDecision::Local
            ),
            address,
            orcpt: None,
            notify: Default::default(),
            status: RecipientStatus::Pending,
        });
        envelope.recipients.push(recipient);
    }
    Ok(body)
}
