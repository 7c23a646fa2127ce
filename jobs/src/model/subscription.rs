//! A subscription's status as Stripe names it.

/// A subscription's status as Stripe names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StripeStatus {
    Incomplete,
    Active,
    Trialing,
    PastDue,
    Paused,
    Unpaid,
    IncompleteExpired,
    Canceled,
}

impl StripeStatus {
    pub const ALL: [StripeStatus; 8] = [
        StripeStatus::Incomplete,
        StripeStatus::Active,
        StripeStatus::Trialing,
        StripeStatus::PastDue,
        StripeStatus::Paused,
        StripeStatus::Unpaid,
        StripeStatus::IncompleteExpired,
        StripeStatus::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StripeStatus::Incomplete => "incomplete",
            StripeStatus::Active => "active",
            StripeStatus::Trialing => "trialing",
            StripeStatus::PastDue => "past_due",
            StripeStatus::Paused => "paused",
            StripeStatus::Unpaid => "unpaid",
            StripeStatus::IncompleteExpired => "incomplete_expired",
            StripeStatus::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<StripeStatus> {
        StripeStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Stripe never moves a subscription on from these: whatever arrives after is history.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            StripeStatus::Canceled | StripeStatus::IncompleteExpired
        )
    }

    /// Breaks a tie between two snapshots of the same second, the same way in every order:
    /// the one further along a subscription's life wins (an end over a lapse, a lapse over a
    /// payment). Stripe's times are whole seconds, so ties are real.
    pub fn rank(self) -> i32 {
        StripeStatus::ALL
            .iter()
            .position(|s| *s == self)
            .unwrap_or(0) as i32
    }
}
