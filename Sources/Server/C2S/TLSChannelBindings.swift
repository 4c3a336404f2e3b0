import CBoringSSLExporter
import NIOCore
import NIOSSL
import XMPPStream

/// Channel-binding data of a live TLS connection, for SCRAM-*-PLUS (RFC 5802 §6).
///
/// `tls-exporter` (RFC 9266) is what TLS 1.3 clients use (`tls-unique` is undefined there,
/// RFC 9266 §3). swift-nio-ssl has no exporter API and keeps its `SSL *` private, so this reads
/// it the one way available, by reflection (`NIOSSLHandler.connection.ssl`), and calls
/// BoringSSL's `SSL_export_keying_material` through the declarations in
/// `CBoringSSLExporter`. If a later swift-nio-ssl renames either property, the pointer is not
/// found, `tls-exporter` is simply not offered, and `TLSExporterTests` fails.
enum TLSChannelBindings {
    /// RFC 9266 §2: the exporter label; the context is empty and the output 32 bytes.
    static let exporterLabel = "EXPORTER-Channel-Binding"
    static let exporterLength = 32

    /// The bindings a SCRAM-*-PLUS client may use on this connection, strongest first.
    /// Must run on the channel's event loop, after the handshake.
    static func bindings(handler: NIOSSLHandler, serverEndPoint: ChannelBinding?) -> [ChannelBinding] {
        var bindings: [ChannelBinding] = []
        if let exporter = tlsExporter(of: handler) {
            bindings.append(ChannelBinding(type: "tls-exporter", data: exporter))
        }
        if let serverEndPoint { bindings.append(serverEndPoint) }
        return bindings
    }

    /// The `tls-exporter` value, on TLS 1.3 only: on TLS 1.2 RFC 9266 §4.2 requires the
    /// extended master secret, which is not checked here, so only `tls-server-end-point` is
    /// offered there.
    static func tlsExporter(of handler: NIOSSLHandler) -> [UInt8]? {
        guard handler.tlsVersion == .tlsv13, let ssl = sslPointer(of: handler) else { return nil }
        var output = [UInt8](repeating: 0, count: exporterLength)
        let label = Array(exporterLabel.utf8)
        let status = output.withUnsafeMutableBufferPointer { out in
            label.withUnsafeBufferPointer { labelBytes in
                labelBytes.withMemoryRebound(to: CChar.self) { labelChars in
                    CNIOBoringSSL_SSL_export_keying_material(
                        ssl, out.baseAddress, out.count, labelChars.baseAddress, labelChars.count,
                        nil, 0, 1)
                }
            }
        }
        return status == 1 ? output : nil
    }

    /// The connection's `SSL *`, or nil when swift-nio-ssl no longer has it where expected.
    static func sslPointer(of handler: NIOSSLHandler) -> OpaquePointer? {
        guard let connection = storedProperty("connection", of: handler) else { return nil }
        return storedProperty("ssl", of: connection) as? OpaquePointer
    }

    /// A stored property of `object` or of one of its superclasses, by name.
    private static func storedProperty(_ name: String, of object: Any) -> Any? {
        var mirror: Mirror? = Mirror(reflecting: object)
        while let current = mirror {
            if let child = current.children.first(where: { $0.label == name }) { return child.value }
            mirror = current.superclassMirror
        }
        return nil
    }
}
