import Hummingbird

/// Adds a module's routes to the HTTPS listener's router (the one serving POSH documents,
/// WebSocket and host-meta), with the server the handlers reach. Called once, when the
/// listener starts.
public typealias HTTPRouteInstaller = @Sendable (Hummingbird.Router<BasicRequestContext>, ServerContext) -> Void
