import Storage
import XMPPCore

/// The subscription state of one contact, as RFC 6121 Appendix A names the states: the
/// subscription (None, To, From, Both) plus "Pending Out" and "Pending In", plus the
/// pre-approval flag of §3.4.
struct SubscriptionState: Equatable, Sendable {
    var to: Bool
    var from: Bool
    var pendingOut: Bool
    var pendingIn: Bool
    var approved: Bool

    init(to: Bool = false, from: Bool = false, pendingOut: Bool = false, pendingIn: Bool = false, approved: Bool = false) {
        self.to = to
        self.from = from
        self.pendingOut = pendingOut
        self.pendingIn = pendingIn
        self.approved = approved
    }

    init(item: RosterItem?, requestStored: Bool) {
        to = item?.subscription == .to || item?.subscription == .both
        from = item?.subscription == .from || item?.subscription == .both
        pendingOut = item?.pendingOut ?? false
        pendingIn = (item?.pendingIn ?? false) || requestStored
        approved = item?.approved ?? false
    }

    var subscription: Subscription {
        switch (to, from) {
        case (false, false): .none
        case (true, false): .to
        case (false, true): .from
        case (true, true): .both
        }
    }

    /// The roster item with this state, keeping the rest of `item`.
    func applied(to item: RosterItem?, contact: JID) -> RosterItem {
        var updated = item ?? RosterItem(jid: contact)
        updated.subscription = subscription
        updated.pendingOut = pendingOut
        updated.pendingIn = pendingIn
        updated.approved = approved
        return updated
    }
}

/// RFC 6121 Appendix A as rules over ``SubscriptionState``. The tables there list every
/// state; these rules give the same transitions (the tests walk every row).
enum SubscriptionRules {
    /// A.2: the user sends a subscription stanza to the contact.
    struct Outbound: Equatable {
        var state: SubscriptionState
        /// Route the stanza to the contact (the user's server stamps the bare JID).
        var route: Bool
    }

    static func outbound(_ type: PresenceType, _ current: SubscriptionState) -> Outbound {
        var next = current
        switch type {
        case .subscribe:
            // A.2.1: a request is always routed; Pending Out unless already subscribed.
            if !current.to { next.pendingOut = true }
            return Outbound(state: next, route: true)
        case .unsubscribe:
            // A.2.2: cancels To and Pending Out; routed regardless.
            next.to = false
            next.pendingOut = false
            return Outbound(state: next, route: true)
        case .subscribed:
            // A.2.3: approving a pending request grants From; otherwise it is a
            // pre-approval (§3.4), remembered and not routed.
            if current.pendingIn {
                next.from = true
                next.pendingIn = false
                next.approved = false
                return Outbound(state: next, route: true)
            }
            if !current.from { next.approved = true }
            return Outbound(state: next, route: false)
        case .unsubscribed:
            // A.2.4: denies a pending request or cancels From; also drops a pre-approval.
            next.approved = false
            if current.pendingIn || current.from {
                next.from = false
                next.pendingIn = false
                return Outbound(state: next, route: true)
            }
            return Outbound(state: next, route: false)
        case .unavailable, .probe, .error:
            return Outbound(state: current, route: false)
        }
    }

    /// A.3: the contact's subscription stanza arrives for the user.
    struct Inbound: Equatable {
        var state: SubscriptionState
        /// Deliver the stanza to the user's available resources.
        var deliver: Bool
        /// Answer the contact with `subscribed` on the user's behalf.
        var autoReplySubscribed: Bool
        /// Send the user's unavailable presence to the contact (§3.3.3).
        var sendUnavailable: Bool
    }

    static func inbound(_ type: PresenceType, _ current: SubscriptionState) -> Inbound {
        var next = current
        switch type {
        case .subscribe:
            if current.from {
                // Already subscribed: answer for the user, bother nobody (§3.1.3).
                return Inbound(state: current, deliver: false, autoReplySubscribed: true, sendUnavailable: false)
            }
            if current.approved {
                // Pre-approved (§3.4): grant at once.
                next.from = true
                next.approved = false
                next.pendingIn = false
                return Inbound(state: next, deliver: false, autoReplySubscribed: true, sendUnavailable: false)
            }
            if current.pendingIn {
                return Inbound(state: current, deliver: false, autoReplySubscribed: false, sendUnavailable: false)
            }
            next.pendingIn = true
            return Inbound(state: next, deliver: true, autoReplySubscribed: false, sendUnavailable: false)
        case .unsubscribe:
            guard current.from || current.pendingIn else {
                return Inbound(state: current, deliver: false, autoReplySubscribed: false, sendUnavailable: false)
            }
            next.from = false
            next.pendingIn = false
            return Inbound(state: next, deliver: true, autoReplySubscribed: false, sendUnavailable: current.from)
        case .subscribed:
            guard current.pendingOut else {
                return Inbound(state: current, deliver: false, autoReplySubscribed: false, sendUnavailable: false)
            }
            next.to = true
            next.pendingOut = false
            return Inbound(state: next, deliver: true, autoReplySubscribed: false, sendUnavailable: false)
        case .unsubscribed:
            guard current.to || current.pendingOut else {
                return Inbound(state: current, deliver: false, autoReplySubscribed: false, sendUnavailable: false)
            }
            next.to = false
            next.pendingOut = false
            return Inbound(state: next, deliver: true, autoReplySubscribed: false, sendUnavailable: false)
        case .unavailable, .probe, .error:
            return Inbound(state: current, deliver: false, autoReplySubscribed: false, sendUnavailable: false)
        }
    }
}
