import NIOCore
import Synchronization

/// One ``XMLNameCache`` per event loop, shared by the parsers of every stream on that loop.
///
/// A cache per stream cost each idle session about 18 KB; streams on one loop never parse at
/// the same time, so they can share one, and it stays warm with the names all of them use.
/// Each cache is bound to its loop (`NIOLoopBound`), so it is only ever touched there.
/// A server holds one of these (no process-wide state).
public final class XMLNameCaches: Sendable {
    private let caches = Mutex<[ObjectIdentifier: (loop: any EventLoop, cache: NIOLoopBound<XMLNameCache>)]>([:])

    public init() {}

    /// The cache of `loop`; call it on that loop.
    public func cache(on loop: any EventLoop) -> XMLNameCache {
        loop.preconditionInEventLoop()
        let key = ObjectIdentifier(loop)
        let bound = caches.withLock { caches -> NIOLoopBound<XMLNameCache> in
            // The identity check guards against a loop that went away and whose address a
            // new one reuses.
            if let known = caches[key], known.loop === loop { return known.cache }
            let made = NIOLoopBound(XMLNameCache(), eventLoop: loop)
            caches[key] = (loop, made)
            return made
        }
        return bound.value
    }
}
